"""MDGDTrainer: a tiny LLaVA trained by transformers.Trainer with MDGD."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from llava_tiny import (
    Examples,
    one_thread,  # noqa: F401  (fixture)
    perturbed_copy,
    tiny_llava,
    trainer_args,
)
from tolerances import prefixed

from mdgd import FIGURES, MDGDConfig, MDGDEngine, llava_trainable_patterns

transformers = pytest.importorskip("transformers")
from mdgd.integrations.hf import CONFIG_NAME, TRAINABLE_NAME, MDGDTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class InOrder(MDGDTrainer):
    """The Trainer with a sequential sampler, so the test knows each micro-batch."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def models():
    ref = tiny_llava(seed=0)
    return perturbed_copy(ref, seed=1), ref


@pytest.mark.parametrize("mode", ["mdgd", "gm"])
def test_trainer_step_equals_engine_step_with_accumulation(tmp_path, mode):
    theta, ref = models()
    cfg = MDGDConfig(mode=mode, alpha=0.3, trainable=llava_trainable_patterns(theta, 2))
    engine_theta, engine_ref = copy.deepcopy(theta), copy.deepcopy(ref)
    data = Examples(theta.config, 4)

    def sgd(model):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

    trainer = InOrder(
        model=theta,
        ref_model=ref,
        mdgd_config=cfg,
        args=trainer_args(tmp_path, max_steps=1),
        train_dataset=data,
    )
    trainer.optimizer = sgd(theta)
    trainer.train()

    engine = MDGDEngine(engine_theta, engine_ref, None, cfg)
    engine.optimizer = sgd(engine_theta)
    mb = [{k: torch.stack([data[i][k] for i in idx]) for k in data[0]} for idx in ((0, 1), (2, 3))]
    engine.backward(mb[0])
    engine.step(mb[1])
    for (name, a), b in zip(theta.named_parameters(), engine_theta.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=prefixed(name))


def test_trainer_logs_mdgd_figures_and_checkpoints(tmp_path):
    theta, ref = models()
    cfg = MDGDConfig(mode="gm", alpha=0.5, trainable=llava_trainable_patterns(theta, 2))
    trainer = MDGDTrainer(
        model=theta,
        ref_model=ref,
        mdgd_config=cfg,
        args=trainer_args(
            tmp_path,
            max_steps=3,
            save_strategy="steps",
            save_steps=3,
            bf16=True,
            learning_rate=1e-3,
        ),
        train_dataset=Examples(theta.config, 8),
    )
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        for key in FIGURES:
            assert f"mdgd/{key}" in h, key
        assert math.isfinite(h["loss"]) and math.isfinite(h["mdgd/loss_v"])
        assert 0.0 < h["mdgd/selected_fraction"] < 1.0
        assert h["mdgd/skipped"] == 0.0
        assert math.isfinite(h["mdgd/conflict_cos_mean"])
    assert all(torch.equal(ref_before[k], v) for k, v in ref.state_dict().items())
    ckpt = tmp_path / "checkpoint-3"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "optimizer.pt").exists()
    assert json.loads((ckpt / CONFIG_NAME).read_text())["mode"] == "gm"
    assert (ckpt / TRAINABLE_NAME).exists()


def test_trainer_resume_from_its_checkpoint(tmp_path):
    def trainer_for(out, **kw):
        theta, ref = models()
        cfg = MDGDConfig(mode="mdgd", trainable=llava_trainable_patterns(theta, 2))
        return theta, InOrder(
            model=theta,
            ref_model=ref,
            mdgd_config=cfg,
            args=trainer_args(out, learning_rate=1e-2, **kw),
            train_dataset=Examples(theta.config, 8),
        )

    full, tr = trainer_for(tmp_path / "full", max_steps=4)
    tr.train()
    _, tr = trainer_for(tmp_path / "half", max_steps=4, save_strategy="steps", save_steps=2)
    tr.train()
    resumed, tr = trainer_for(tmp_path / "half", max_steps=4)
    tr.train(resume_from_checkpoint=str(tmp_path / "half" / "checkpoint-2"))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=prefixed(name))


def test_trainer_rejects_bad_configuration(tmp_path):
    theta, ref = models()
    with pytest.raises(ValueError, match="matches the trainable patterns"):
        MDGDTrainer(
            model=theta,
            ref_model=ref,
            args=trainer_args(tmp_path),
            mdgd_config=MDGDConfig(trainable=[r"^nothing\."]),
        )
    with pytest.raises(ValueError, match="needs ref_model"):
        MDGDTrainer(
            model=theta,
            args=trainer_args(tmp_path),
            mdgd_config=MDGDConfig(trainable=llava_trainable_patterns(theta, 1)),
        )
