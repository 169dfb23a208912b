"""Clipping in step(), the step counter, config mismatches and an empty loss path."""

from __future__ import annotations

import copy

import pytest
import torch
from llava_tiny import (
    Examples,
    one_thread,  # noqa: F401  (fixture)
    random_batch,
    text_only_batch,
    tiny_llava,
    trainer_args,
)
from tiny_engines import build
from tolerances import prefixed

from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns, mark_trainable

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP = 0.05


def _params(engine) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.theta.params]


@pytest.mark.parametrize("mode", ["mdgd", "gm", "ft"])
def test_max_grad_norm_equals_a_hand_written_clip(mode):
    auto, theta, *_ = build(mode, optim="adamw", alpha=0.3, max_grad_norm=CLIP)
    hand, theta_h, *_ = build(mode, optim="adamw", alpha=0.3)
    norms = []
    for step in range(2):
        batch = random_batch(theta.config, seed=50 + step)
        auto.step(batch)
        hand.backward(batch)
        hand.compute_direction()
        params = [p for p in hand.theta.params if p.grad is not None]
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
        hand.optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(_params(auto), _params(hand)))
    assert min(norms) > CLIP, "the test must actually clip"
    assert auto.step_count == hand.step_count == 2


def test_max_grad_norm_in_the_trainer_equals_the_engine(tmp_path):
    from mdgd.integrations.hf import MDGDTrainer

    ref = tiny_llava(seed=0)
    theta = copy.deepcopy(ref)
    with torch.no_grad():
        for p in theta.parameters():
            p.add_(0.02 * torch.randn_like(p))
    cfg = MDGDConfig(trainable=llava_trainable_patterns(theta, 2), max_grad_norm=CLIP)
    e_theta, e_ref = copy.deepcopy(theta), copy.deepcopy(ref)
    data = Examples(theta.config, 4)
    args = trainer_args(
        tmp_path,
        max_steps=1,
        gradient_accumulation_steps=1,
        per_device_train_batch_size=4,
        train_sampling_strategy="sequential",
    )
    trainer = MDGDTrainer(
        model=theta, ref_model=ref, mdgd_config=cfg, args=args, train_dataset=data
    )
    assert trainer.args.max_grad_norm == CLIP
    trainer.train()
    assert trainer.engine.step_count == 1
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert norms and norms[0] > CLIP, "the test must actually clip"

    mark_trainable(e_theta, cfg.trainable)
    opt = torch.optim.AdamW(
        [p for p in e_theta.parameters() if p.requires_grad], lr=0.5, weight_decay=0.0
    )
    engine = MDGDEngine(e_theta, e_ref, opt, cfg)
    engine.step({k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]})
    for (name, a), b in zip(theta.named_parameters(), e_theta.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=prefixed(name))


def test_bad_max_grad_norm():
    with pytest.raises(ValueError, match="max_grad_norm"):
        MDGDConfig(max_grad_norm=0.0)


# ---------------------------------------------------------------------- config mismatch


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda c: setattr(c, "vision_feature_layer", -2), "'vision_feature_layer'"),
        (
            lambda c: c.text_config.rope_parameters.update(rope_theta=5000.0),
            "'text_config.rope_parameters.rope_theta'",
        ),
        (lambda c: setattr(c.text_config, "rms_norm_eps", 1e-5), "'text_config.rms_norm_eps'"),
    ],
    ids=["vision_feature_layer", "rope_theta", "rms_norm_eps"],
)
def test_ref_model_with_another_config_is_refused(change, key):
    ref = tiny_llava(seed=0)
    theta = copy.deepcopy(ref)
    change(ref.config)
    pats = llava_trainable_patterns(theta, 2)
    with pytest.raises(ValueError, match=f"config differs from model's at {key}"):
        MDGDEngine(theta, ref, None, MDGDConfig(trainable=pats))


def test_training_only_config_keys_may_differ():
    ref = tiny_llava(seed=0)
    theta = copy.deepcopy(ref)
    theta.config.use_cache = True
    theta.config.text_config.attention_dropout = 0.1
    theta.config.output_hidden_states = True
    MDGDEngine(theta, ref, None, MDGDConfig(trainable=llava_trainable_patterns(theta, 2)))


# ---------------------------------------------------------------------- empty loss path


def test_no_trainable_parameter_on_the_loss_path():
    """Training only CLIP's post_layernorm, which LLaVA never uses (it takes the
    tower's hidden states, not its pooled output): a clear ValueError, not torch's
    "element 0 of tensors does not require grad"."""
    ref = tiny_llava(seed=0)
    theta = copy.deepcopy(ref)
    pats = [r"vision_tower\.post_layernorm\."]
    engine = MDGDEngine(theta, ref, None, MDGDConfig(trainable=pats))
    with pytest.raises(ValueError, match="no trainable parameter lies on the loss path"):
        engine.backward(random_batch(theta.config, seed=1))
    assert engine.num_micro_batches == 0


def test_text_only_batch_off_the_trainable_path_contributes_zero():
    """Training only the projector, a text-only micro-batch reaches no trainable
    parameter: it adds zero gradients instead of failing."""
    ref = tiny_llava(seed=0)
    theta = copy.deepcopy(ref)
    pats = llava_trainable_patterns(theta, 0, projector=True)
    engine = MDGDEngine(theta, ref, None, MDGDConfig(trainable=pats))
    engine.backward(text_only_batch(theta.config, seed=2))
    assert not engine.theta.buffers["g"].any() and not engine.theta.buffers["h"].any()
    figures = engine.compute_direction()
    assert figures["text_only_fraction"] == 1.0 and figures["skipped"] == 0.0
