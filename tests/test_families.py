"""Every MLLM family llava_trainable_patterns knows, from a tiny config: the default
patterns, two MDGD steps in MDGDEngine and in MDGDTrainer, L_v > 0 on image batches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from llava_tiny import one_thread, trainer_args  # noqa: F401  (fixture)
from vlm_tiny import FAMILIES, build, image_batch

from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns, mark_trainable
from mdgd.families import FAMILY_MODULES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", FAMILIES)
def test_default_patterns_select_last_layers_and_projector(family):
    model = build(family)
    pats = llava_trainable_patterns(model, num_layers=1)
    assert pats == llava_trainable_patterns(model.config, num_layers=1)
    chosen = [n for n, _ in mark_trainable(model, pats)]
    layers, projector = FAMILY_MODULES[family]
    assert any(n.startswith(f"{layers}.1.") for n in chosen)
    assert not any(n.startswith(f"{layers}.0.") for n in chosen)
    for name in projector:
        assert any(n == name or n.startswith(name + ".") for n in chosen), name
    assert "lm_head.weight" not in chosen
    assert all(n.startswith((f"{layers}.1.", *projector)) for n in chosen)


class Batches(torch.utils.data.Dataset):
    """Whole micro-batches as items (the Trainer's batch size is 1, collated by unwrapping)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


@pytest.mark.parametrize("driver", ["engine", "trainer"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_two_mdgd_steps(family, driver, tmp_path):
    ref = build(family, seed=0)
    theta = copy.deepcopy(ref)
    cfg = MDGDConfig(mode="mdgd", trainable=llava_trainable_patterns(theta, num_layers=1))
    batches = [image_batch(theta, seed=s) for s in (1, 2)]
    before = {n: p.detach().clone() for n, p in theta.named_parameters()}
    if driver == "engine":
        mark_trainable(theta, cfg.trainable)
        params = [p for p in theta.parameters() if p.requires_grad]
        engine = MDGDEngine(theta, ref, torch.optim.AdamW(params, lr=1e-3), cfg)
        figures = [engine.step(b) for b in batches]
    else:
        from mdgd.integrations.hf import MDGDTrainer

        args = trainer_args(
            tmp_path,
            max_steps=2,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=1,
            learning_rate=1e-3,
            train_sampling_strategy="sequential",
            remove_unused_columns=False,
        )
        trainer = MDGDTrainer(
            model=theta,
            ref_model=ref,
            mdgd_config=cfg,
            args=args,
            train_dataset=Batches(batches),
            data_collator=lambda rows: rows[0],
        )
        trainer.train()
        engine = trainer.engine
        figures = [h for h in trainer.state.log_history if "mdgd/loss_v" in h]
        figures = [{k.removeprefix("mdgd/"): v for k, v in h.items()} for h in figures]
    assert engine.step_count == 2 and len(figures) == 2
    assert figures[0]["loss_v"] == 0.0, "theta = phi at the first step: L_v = 0"
    assert figures[1]["loss_v"] > 0.0, "the visual representation moved: L_v > 0"
    for f in figures:
        assert f["skipped"] == 0.0 and math.isfinite(f["loss"]) and f["text_only_fraction"] == 0
    moved = {n for n, p in theta.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(engine.param_names), "only the default trainable set may change"


def test_unknown_family_lists_the_candidates():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 3)
            self.vision_adapter = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"ModuleLists: blocks \(3\).*projector: vision_adapter"):
        llava_trainable_patterns(Odd(), num_layers=1)
    with pytest.raises(ValueError, match="pass the model instead"):
        llava_trainable_patterns(
            type("Cfg", (), {"model_type": "odd", "num_hidden_layers": 2})(), 1
        )
