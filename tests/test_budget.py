"""MDGD-GM's budget in the driver: measured changed elements against the mask."""

from __future__ import annotations

import copy

import pytest
import torch
from llava_tiny import (
    one_thread,  # noqa: F401  (fixture)
    random_batch,
    tiny_llava,
)
from tiny_engines import build

import mdgd_kernels as mk
from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns, mark_trainable

pytestmark = pytest.mark.usefixtures("one_thread")

K = 64
CPU_BACKENDS = [b for b in mk.available_backends("cpu") if b != "triton"]


def _flat(engine) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in engine.theta.params])


def _moments(engine) -> torch.Tensor:
    """``[2, N]``: AdamW's exp_avg and exp_avg_sq over the flat space (0 before the first step)."""
    rows = []
    for key in ("exp_avg", "exp_avg_sq"):
        parts = [
            engine.optimizer.state.get(p, {}).get(key, torch.zeros_like(p)).reshape(-1).clone()
            for p in engine.theta.params
        ]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def _selected_elements(engine) -> torch.Tensor:
    sizes = torch.tensor(engine.segments.sizes)
    return torch.repeat_interleave(engine.last_result.mask.cpu(), sizes)


@pytest.mark.parametrize("freeze", [True, False], ids=["freeze", "no-freeze"])
def test_gm_block_changed_fraction_is_measured(freeze):
    engine, theta, *_ = build(
        "gm", optim="adamw", alpha=0.1, granularity=f"block:{K}", freeze_unselected=freeze
    )
    n = engine.theta.numel
    for step in range(3):  # from step 2 on, AdamW's momentum acts on zero-gradient blocks
        before, m_before = _flat(engine), _moments(engine)
        figures = engine.step(random_batch(theta.config, seed=60 + step))
        changed = _flat(engine) != before
        selected = _selected_elements(engine)
        measured = changed.double().mean().item()
        print(
            f"step {step}: selected {figures['selected_fraction']:.4f} "
            f"updated {figures['updated_fraction']:.4f} measured changed {measured:.4f}"
        )
        tensors = len(engine.theta.params)
        assert abs(measured - figures["updated_fraction"]) <= tensors * K / n
        if freeze:
            assert not (changed & ~selected).any(), "an unselected element changed"
            moved = (_moments(engine) != m_before).any(0)
            assert not (moved & ~selected).any(), "an unselected element's moments moved"
            assert figures["updated_fraction"] == figures["selected_fraction"]
        else:
            assert figures["updated_fraction"] > 2 * figures["selected_fraction"]
        assert figures["selected_fraction"] <= 0.1 + K / n


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("alpha_by", ["elements", "segments"])
def test_gm_at_theta_equal_phi_keeps_alpha(backend, alpha_by):
    """theta = phi: every cos ties at 1; alpha = 0.1 keeps at most 10% plus one block."""
    ref = tiny_llava(seed=0)
    theta = copy.deepcopy(ref)
    pats = llava_trainable_patterns(theta, 2)
    mark_trainable(theta, pats)
    opt = torch.optim.AdamW([p for p in theta.parameters() if p.requires_grad], lr=1e-2)
    cfg = MDGDConfig(
        mode="gm",
        alpha=0.1,
        alpha_by=alpha_by,
        granularity=f"block:{K}",
        trainable=pats,
        backend=backend,
    )
    engine = MDGDEngine(theta, ref, opt, cfg)
    before = _flat(engine)
    figures = engine.step(random_batch(theta.config, seed=61))
    res = engine.last_result
    live = res.cos != 0  # segments with a gradient: cos exactly 1 at theta = phi
    assert torch.equal(res.cos[live], torch.ones(int(live.sum())))
    n, segs = engine.theta.numel, len(engine.segments.sizes)
    if alpha_by == "elements":
        assert 0.1 <= figures["selected_fraction"] <= 0.1 + K / n
    else:
        assert 0.1 * segs <= int(res.mask.sum()) <= 0.1 * segs + 1
    measured = (_flat(engine) != before).double().mean().item()
    assert measured <= figures["selected_fraction"]
    print(
        f"{backend} {alpha_by}: selected {figures['selected_fraction']:.4f} changed {measured:.4f}"
    )


def test_trainer_freezes_the_unselected_blocks(tmp_path):
    """MDGDTrainer's own AdamW (weight decay on) changes exactly the selected blocks."""
    from llava_tiny import Examples, trainer_args

    from mdgd.integrations.hf import MDGDTrainer

    engine, theta, ref, *_ = build("gm", alpha=0.1, granularity=f"block:{K}")
    args = trainer_args(
        tmp_path,
        max_steps=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        train_sampling_strategy="sequential",
    )
    trainer = MDGDTrainer(
        model=theta,
        ref_model=ref,
        mdgd_config=engine.config,
        args=args,
        train_dataset=Examples(theta.config, 4),
    )
    trainer.create_optimizer()
    step = trainer.optimizer.step
    changed = []

    def stepped(*a, **kw):  # record the elements the whole optimizer step changes
        before = _flat(trainer.engine)
        out = step(*a, **kw)
        changed.append(_flat(trainer.engine) != before)
        return out

    trainer.optimizer.step = stepped
    trainer.train()
    selected = _selected_elements(trainer.engine)
    assert len(changed) == 1 and changed[0].any()
    assert not (changed[0] & ~selected).any(), "the Trainer's AdamW moved an unselected block"
    assert changed[0].double().mean() <= 0.1 + K / trainer.engine.theta.numel
