"""MDGDEngine against an independent computation of one step.

The independent side builds the four gradients with ``torch.autograd.grad`` on
deep copies of the two models, averages them over the micro-batches, computes
the float64 reference direction (``mdgd_kernels.reference.reference_direction``) and
applies plain SGD (lr = 1) by hand: ``theta_1 = theta_0 - d``. The engine's step
must land on the same parameters, within the op tolerance table of conftest.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import term_scale
from llava_tiny import (
    one_thread,  # noqa: F401  (fixture)
    random_batch,
    tiny_llava,
)
from step_oracle import independent
from tiny_engines import assert_update_matches, build, flat_params, trainable_patterns

from mdgd import FIGURES, MDGDConfig, MDGDEngine, mark_trainable
from mdgd_kernels.reference import reference_direction

BLOCK = 100

pytestmark = pytest.mark.usefixtures("one_thread")


def segment_sizes(sizes: list[int], granularity: str) -> tuple[list[int], list[int]]:
    """Segment sizes and the owning parameter of each segment (written independently)."""
    if granularity == "tensor":
        return sizes, list(range(len(sizes)))
    if granularity == "global":
        return [sum(sizes)], [0]
    k = int(granularity.split(":")[1])
    segs, owner = [], []
    for i, n in enumerate(sizes):
        for lo in range(0, n, k):
            segs.append(min(k, n - lo))
            owner.append(i)
    return segs, owner


CASES = [
    # (mode, granularity, micro-batches, extra config)
    ("mdgd", "tensor", 1, {}),
    ("mdgd", "tensor", 1, {"align": False, "visual_weight": 0.5}),
    ("gm", "tensor", 1, {"alpha": 0.3}),
    ("gm", "tensor", 1, {"alpha": 0.3, "alpha_by": "segments", "align": False}),
    ("ft", "tensor", 1, {}),
    ("mdgd", "global", 1, {}),
    ("mdgd", f"block:{BLOCK}", 1, {}),
    ("gm", f"block:{BLOCK}", 1, {"alpha": 0.4}),
    ("gm", "global", 1, {"alpha": 0.5}),
    ("mdgd", "tensor", 2, {}),
    ("gm", "tensor", 2, {"alpha": 0.3}),
    ("ft", "tensor", 2, {}),
    ("mdgd", f"block:{BLOCK}", 2, {}),
]


def case_id(case) -> str:
    mode, gran, n, extra = case
    return "-".join(
        [mode, gran.replace(":", ""), f"{n}mb"] + [f"{k}={v}" for k, v in extra.items()]
    )


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_step_matches_independent_computation(case):
    mode, gran, n_micro, extra = case
    engine, theta, ref, o_theta, o_ref = build(mode, granularity=gran, **extra)
    names = engine.param_names
    cfg = engine.config
    batches = [random_batch(theta.config, batch_size=2, seed=10 + i) for i in range(n_micro)]
    bufs, losses = independent(o_theta, o_ref, names, batches, cfg)
    sizes = [p.numel() for p in engine.theta.params]
    segs, owner = segment_sizes(sizes, gran)
    want = reference_direction(*bufs, segs, **cfg.op_kwargs())

    p0 = flat_params(theta, names)
    for b in batches[:-1]:
        engine.backward(b)
    figures = engine.step(batches[-1])
    p1 = flat_params(theta, names)
    assert_update_matches(p0, p1, want, bufs, segs, torch.float32)

    # the figures
    assert set(FIGURES) <= set(figures)
    assert figures["loss"] == pytest.approx(losses[0].item(), rel=1e-5)
    assert figures["skipped"] == 0.0
    if mode == "ft":
        assert math.isnan(figures["loss_ref"]) and math.isnan(figures["cos_mean"])
        assert figures["selected_fraction"] == 1.0
        return
    assert figures["loss_ref"] == pytest.approx(losses[1].item(), rel=1e-5)
    assert figures["loss_v"] == pytest.approx(losses[2].item(), rel=1e-5)
    assert figures["cos_mean"] == pytest.approx(want.cos.mean().item(), abs=1e-4)
    assert figures["cos_std"] == pytest.approx(want.cos.std(correction=0).item(), abs=1e-4)
    seg_t = torch.tensor(segs, dtype=torch.float64)
    frac = (want.mask.double() * seg_t).sum() / seg_t.sum()
    assert figures["selected_fraction"] == pytest.approx(frac.item(), rel=1e-9)
    assert torch.equal(engine.last_result.mask.cpu(), want.mask)

    # the modality gradient conflict per parameter: cos(g_theta, h_theta)
    gt, ht = torch.split(bufs[0], sizes), torch.split(bufs[1], sizes)
    if gran == "global":
        conflict = [torch.dot(bufs[0], bufs[1]) / (bufs[0].norm() * bufs[1].norm())]
    else:
        conflict = [torch.dot(a, b) / (a.norm() * b.norm()) for a, b in zip(gt, ht)]
    expect = torch.stack(conflict)
    assert figures["conflict_cos_mean"] == pytest.approx(expect.mean().item(), abs=1e-4)
    got = torch.tensor(list(engine.conflict_cos().values()), dtype=torch.float64)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=0)

    # MDGD-GM: a parameter with no selected segment has grad None (the optimizer skips it)
    if mode == "gm":
        selected = torch.zeros(len(sizes), dtype=torch.bool)
        if gran == "global":
            selected[:] = bool(want.mask[0])
        else:
            for s, o in enumerate(owner):
                selected[o] |= bool(want.mask[s])
        has_grad = torch.tensor([p.grad is not None for p in engine.theta.params])
        assert torch.equal(has_grad, selected)
        assert 0 < int(selected.sum()) <= len(sizes)


def test_gm_leaves_masked_parameters_and_their_moments_alone():
    engine, theta, ref, *_ = build("gm", optim="adamw", alpha=0.2)
    before = {n: p.detach().clone() for n, p in zip(engine.param_names, engine.theta.params)}
    engine.step(random_batch(theta.config, seed=3))
    mask = engine.last_result.mask.tolist()
    assert 0 < sum(mask) < len(mask)
    for (name, p), keep in zip(zip(engine.param_names, engine.theta.params), mask):
        state = engine.optimizer.state.get(p, {})
        if keep:
            assert not torch.equal(p, before[name]), name
            assert "exp_avg" in state
        else:
            assert torch.equal(p, before[name]), f"{name} was masked out but changed"
            assert not state, f"{name} was masked out but the optimizer made state for it"


def test_theta_equal_phi_gives_twice_g():
    """At theta == phi, L_v = 0, h = 0, k = 1 and d = 2 g_theta (docs/math.md §1)."""
    ref = tiny_llava(seed=0)
    theta = copy.deepcopy(ref)
    pats = trainable_patterns()
    mark_trainable(theta, pats)
    opt = torch.optim.SGD([p for p in theta.parameters() if p.requires_grad], lr=1.0)
    engine = MDGDEngine(theta, ref, None, MDGDConfig(trainable=pats))
    batch = random_batch(theta.config, seed=4)
    engine.backward(batch)
    g = engine.theta.buffers["g"].clone()
    figures = engine.compute_direction()
    assert figures["loss_v"] == 0.0 and math.isnan(figures["conflict_cos_mean"])
    torch.testing.assert_close(engine.theta.buffers["g"], 2 * g, rtol=1e-5, atol=1e-7)
    del opt


def test_buffers_alias_grads_and_are_allocated_once():
    engine, theta, ref, *_ = build("mdgd")
    bufs = {
        (side, k): b
        for side, fg in (("theta", engine.theta), ("phi", engine.phi))
        for k, b in fg.buffers.items()
    }
    ptrs = {k: b.data_ptr() for k, b in bufs.items()}
    for step in range(2):
        engine.backward(random_batch(theta.config, seed=step))
        # after backward the .grad of both models are the h views (last backward wrote there)
        for fg in (engine.theta, engine.phi):
            for p, v in zip(fg.params, fg.views["h"]):
                assert p.grad is v, "autograd replaced the .grad view instead of adding into it"
                assert p.grad.untyped_storage().data_ptr() == fg.buffers["h"].data_ptr()
        engine.step()
        for p, v in zip(engine.theta.params, engine.theta.views["g"]):
            assert p.grad is v and p.grad.data_ptr() == v.data_ptr()
        assert all(p.grad is None for p in engine.phi.params)
    assert ptrs == {k: b.data_ptr() for k, b in bufs.items()}


def test_ref_model_frozen_and_nothing_below_lowest_trainable_layer_gets_gradients():
    engine, theta, ref, *_ = build("mdgd", optim="adamw")
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    trainable = set(engine.param_names)
    seen = {}

    def record(name):
        def hook(_mod, _inp, out):
            t = out[0] if isinstance(out, tuple) else out
            t = getattr(t, "last_hidden_state", t)
            seen[name] = t.requires_grad

        return hook

    for tag, model in (("theta", theta), ("phi", ref)):
        model.model.vision_tower.register_forward_hook(record(f"{tag}.vision_tower"))
    for step in range(3):
        engine.backward(random_batch(theta.config, seed=20 + step))
        for tag, model in (("theta", theta), ("phi", ref)):
            for name, p in model.named_parameters():
                if name in trainable:
                    assert p.grad is not None, f"{tag}.{name} got no gradient"
                else:
                    assert p.grad is None, f"{tag}.{name} is below the trainable set but got a grad"
                    assert not p.requires_grad
        engine.step()
    # the frozen vision towers never built a graph
    assert seen == {"theta.vision_tower": False, "phi.vision_tower": False}
    after = ref.state_dict()
    assert all(torch.equal(ref_before[k], after[k]) for k in ref_before), "ref_model changed"
    assert all(p.grad is None for p in ref.parameters())
    assert not ref.training
    held = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in held for p in ref.parameters())


def test_ft_mode_skips_the_reference_model():
    engine, theta, ref, *_ = build("ft")
    calls = []
    ref.register_forward_hook(lambda *a: calls.append(1))
    engine.step(random_batch(theta.config, seed=5))
    assert not calls and engine.phi is None
    assert set(engine.theta.buffers) == {"g"}


@pytest.mark.parametrize("mode", ["mdgd", "gm"])
def test_bf16_parameters(mode):
    engine, theta, ref, o_theta, o_ref = build(mode, dtype=torch.bfloat16, alpha=0.3)
    assert engine.theta.buffers["g"].dtype == torch.bfloat16
    batch = random_batch(theta.config, seed=6)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    bufs, _ = independent(o_theta, o_ref, engine.param_names, [batch], engine.config)
    sizes = [p.numel() for p in engine.theta.params]
    want = reference_direction(*bufs, sizes, mode=mode, alpha=0.3)
    engine.backward(batch)
    figures = engine.compute_direction()
    assert figures["skipped"] == 0.0 and math.isfinite(figures["loss_v"])
    got = torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
            for p in engine.theta.params
        ]
    )
    scale = term_scale(want, bufs, sizes)
    # bf16 forward/backward differ between the two computations by bf16 rounding
    bad = (got - want.direction).abs() > 0.1 * scale
    assert bad.float().mean() < 1e-3, f"{int(bad.sum())} elements far from the reference"


def _autocast_direction(dtype, scaler=None):
    engine, theta, ref, o_theta, o_ref = build("mdgd")
    engine.scaler = scaler
    batch = random_batch(theta.config, seed=7)
    with torch.autocast("cpu", dtype=dtype):
        bufs, _ = independent(o_theta, o_ref, engine.param_names, [batch], engine.config)
        engine.backward(batch)
    figures = engine.compute_direction()
    got = torch.cat([p.grad.reshape(-1).double() for p in engine.theta.params])
    sizes = [p.numel() for p in engine.theta.params]
    want = reference_direction(*bufs, sizes, mode="mdgd")
    return engine, figures, got, want, term_scale(want, bufs, sizes)


def test_autocast_bf16():
    engine, figures, got, want, scale = _autocast_direction(torch.bfloat16)
    assert figures["skipped"] == 0.0
    assert ((got - want.direction).abs() <= 1e-4 * scale).all()


def test_fp16_grad_scaler_scales_all_four_gradients_alike():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    engine, figures, got, want, scale = _autocast_direction(torch.float16, scaler)
    assert figures["skipped"] == 0.0
    # the direction is computed on scaled buffers: d(s * grads) = s * d(grads)
    assert ((got / 2.0**12 - want.direction).abs() <= 2e-3 * scale).all()
    before = [p.detach().clone() for p in engine.theta.params]
    scaler.step(engine.optimizer)
    scaler.update()
    assert all(not torch.equal(a, p) for a, p in zip(before, engine.theta.params))


def test_fp16_grad_scaler_overflow_skips_and_backs_off():
    engine, theta, *_ = build("mdgd", nonfinite="raise")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    engine.scaler = scaler
    before = [p.detach().clone() for p in engine.theta.params]
    with torch.autocast("cpu", dtype=torch.float16):
        figures = engine.step(random_batch(theta.config, seed=8))
    assert figures["skipped"] == 1.0
    assert scaler.get_scale() == 2.0**119
    assert all(torch.equal(a, p) for a, p in zip(before, engine.theta.params))


def _poison(engine, index: int) -> None:
    engine.theta.params[index].register_hook(lambda g: torch.full_like(g, float("nan")))


def test_nonfinite_raise_names_the_parameter():
    engine, theta, *_ = build("mdgd")
    _poison(engine, 3)
    before = [p.detach().clone() for p in engine.theta.params]
    with pytest.raises(FloatingPointError, match=engine.param_names[3].replace(".", r"\.")):
        engine.step(random_batch(theta.config, seed=9))
    assert all(torch.equal(a, p) for a, p in zip(before, engine.theta.params))
    assert engine.num_micro_batches == 0


def test_nonfinite_skip_leaves_everything_unchanged():
    engine, theta, *_ = build("mdgd", optim="adamw", nonfinite="skip")
    _poison(engine, 0)
    before = [p.detach().clone() for p in engine.theta.params]
    figures = engine.step(random_batch(theta.config, seed=9))
    assert figures["skipped"] == 1.0
    assert all(torch.equal(a, p) for a, p in zip(before, engine.theta.params))
    assert not engine.optimizer.state


# ---------------------------------------------------------------------- bad configurations


def test_no_trainable_parameter_matched():
    ref = tiny_llava(seed=0)
    theta = copy.deepcopy(ref)
    opt = torch.optim.SGD(theta.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no parameter .* matches the trainable patterns"):
        MDGDEngine(theta, ref, opt, MDGDConfig(trainable=[r"^model\.nothing\."]))
    for p in theta.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        MDGDEngine(theta, ref, opt, MDGDConfig())


def test_ref_model_of_another_architecture():
    from transformers import LlamaConfig, LlamaForCausalLM

    theta = tiny_llava(seed=0)
    pats = trainable_patterns()
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=64,
        )
    )
    with pytest.raises(ValueError, match="ref_model is a LlamaForCausalLM"):
        MDGDEngine(theta, llama, None, MDGDConfig(trainable=pats))
    wider = tiny_llava(seed=0, text_hidden=48)
    with pytest.raises(ValueError, match="architecture differs.* in ref_model but"):
        MDGDEngine(theta, wider, None, MDGDConfig(trainable=pats))
    deeper = tiny_llava(seed=0, text_layers=4)
    with pytest.raises(ValueError, match="layers.3.* exists only in ref_model"):
        MDGDEngine(theta, deeper, None, MDGDConfig(trainable=pats))
    with pytest.raises(ValueError, match="shares parameter"):
        MDGDEngine(theta, theta, None, MDGDConfig(trainable=pats))
    with pytest.raises(ValueError, match="needs ref_model"):
        MDGDEngine(theta, None, None, MDGDConfig(trainable=pats))


def test_optimizer_must_hold_theta_only():
    ref = tiny_llava(seed=0)
    theta = copy.deepcopy(ref)
    pats = trainable_patterns()
    mark_trainable(theta, pats)
    both = torch.optim.SGD(list(theta.parameters()) + list(ref.parameters()), lr=0.1)
    with pytest.raises(ValueError, match="holds .* parameter\\(s\\) of ref_model"):
        MDGDEngine(theta, ref, both, MDGDConfig(trainable=pats))
    partial = torch.optim.SGD([theta.lm_head.weight], lr=0.1)
    with pytest.raises(ValueError, match="does not hold"):
        MDGDEngine(theta, ref, partial, MDGDConfig(trainable=pats))


def test_batch_without_labels_fails_before_anything_runs():
    engine, theta, *_ = build("mdgd")
    batch = random_batch(theta.config, seed=1)
    before = [p.detach().clone() for p in engine.theta.params]
    with pytest.raises(ValueError, match="no 'labels'"):
        engine.backward({k: v for k, v in batch.items() if k != "labels"})
    assert engine.num_micro_batches == 0 and engine.step_count == 0
    assert all(torch.equal(a, p) for a, p in zip(before, engine.theta.params))
    with pytest.raises(RuntimeError, match="call backward"):
        engine.step()
