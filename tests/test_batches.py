"""A LLaVA data mix: text-only micro-batches, micro-batches with no supervised token,
non-finite losses, in MDGDEngine and MDGDTrainer."""

from __future__ import annotations

import math

import pytest
import torch
from llava_tiny import (
    MixedExamples,
    collate,
    one_thread,  # noqa: F401  (fixture)
    random_batch,
    text_only_batch,
    trainer_args,
    unsupervised,
)
from step_oracle import independent
from tiny_engines import assert_update_matches, build, flat_params
from tolerances import prefixed

from mdgd import FIGURES
from mdgd.batches import SKIPPED, MicroBatch
from mdgd_kernels.reference import reference_direction

pytestmark = pytest.mark.usefixtures("one_thread")

MIXES = {
    "image+text": ("I", "T"),
    "text+text": ("T", "T"),
    "image+empty": ("I", "E"),
    "text+empty": ("T", "E"),
}


def micro_batches(config, mix) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, kind in enumerate(mix):
        if kind == "T":
            out.append(text_only_batch(config, seed=30 + i))
        else:
            b = random_batch(config, seed=30 + i)
            out.append(unsupervised(b) if kind == "E" else b)
    return out


def count_visual_calls(engine) -> list[int]:
    calls = []
    hook = engine.visual

    class Counting:
        forward_kwargs = hook.forward_kwargs
        check = hook.check
        is_text_only = hook.is_text_only

        def __call__(self, *a):
            calls.append(1)
            return hook(*a)

    engine.visual = Counting()
    return calls


@pytest.mark.parametrize("mix", MIXES, ids=str)
@pytest.mark.parametrize("mode", ["mdgd", "gm", "ft"])
def test_mixed_micro_batches_match_independent_computation(mode, mix):
    engine, theta, ref, o_theta, o_ref = build(mode, alpha=0.3)
    batches = micro_batches(theta.config, MIXES[mix])
    names, cfg = engine.param_names, engine.config
    bufs, losses = independent(o_theta, o_ref, names, batches, cfg)
    sizes = [p.numel() for p in engine.theta.params]
    want = reference_direction(*bufs, sizes, mode=mode, alpha=cfg.alpha)
    calls = count_visual_calls(engine)

    p0 = flat_params(theta, names)
    engine.backward(batches[0])
    if mode != "ft" and MIXES[mix][0] == "T":  # no h backward for a text-only micro-batch
        assert not engine.theta.buffers["h"].any() and not engine.phi.buffers["h"].any()
    figures = engine.step(batches[1])
    assert_update_matches(p0, flat_params(theta, names), want, bufs, sizes, torch.float32)

    images = sum(k in "IE" for k in MIXES[mix])
    texts = sum(k == "T" for k in MIXES[mix])
    assert figures["skipped"] == 0.0 and math.isfinite(figures["loss"])
    assert figures["loss"] == pytest.approx(losses[0].item(), rel=1e-5)
    assert figures["supervised_fraction"] == 1 - MIXES[mix].count("E") / 2
    if mode == "ft":
        assert math.isnan(figures["text_only_fraction"])
        return
    assert len(calls) == 2 * (2 - texts), "the visual hook ran on a text-only micro-batch"
    assert figures["text_only_fraction"] == texts / 2
    assert figures["loss_v"] == pytest.approx(losses[2].item(), rel=1e-5)
    assert (figures["loss_v"] > 0) == (images > 0)


def test_micro_batch_without_supervised_token_adds_nothing_to_g():
    engine, theta, *_ = build("mdgd")
    batch = unsupervised(random_batch(theta.config, seed=3))
    engine.backward(batch)
    assert not engine.theta.buffers["g"].any() and not engine.phi.buffers["g"].any()
    assert engine.theta.buffers["h"].any(), "its L_v still counts"


def test_skipped_index_matches_the_figures():
    assert FIGURES.index("skipped") == SKIPPED


def test_task_loss_zeroes_only_a_loss_over_no_token():
    """The mean over zero tokens (NaN) becomes 0; a real NaN or Inf is kept."""
    some = torch.tensor([[-100, 5, -100]])
    none = torch.tensor([[7, -100, -100]])  # the first label is never a target
    for labels, loss, want in (
        (none, math.nan, 0.0),
        (some, math.nan, math.nan),
        (some, math.inf, math.inf),
        (some, 2.5, 2.5),
    ):
        mb = MicroBatch(text_only=False, supervised=(labels[..., 1:] != -100).any())
        out = type("Out", (), {"loss": torch.tensor(loss)})()
        got = mb.task_loss(out, "model").item()
        assert got == want or (math.isnan(got) and math.isnan(want))


MODES4 = {
    "mdgd": dict(mode="mdgd"),
    "mdgd-noalign": dict(mode="mdgd", align=False),
    "gm": dict(mode="gm", alpha=0.3),
    "ft": dict(mode="ft"),
}


def _adamw_after_one_step(mode_kw, nonfinite):
    engine, theta, *_ = build(optim="adamw", nonfinite=nonfinite, **mode_kw)
    engine.step(random_batch(theta.config, seed=2))  # the moments and step counters exist
    state = {
        id(p): {k: v.clone() for k, v in engine.optimizer.state[p].items()}
        for p in engine.theta.params
        if p in engine.optimizer.state
    }
    return engine, theta, [p.detach().clone() for p in engine.theta.params], state


def _assert_untouched(engine, before, state) -> None:
    assert all(torch.equal(a, p) for a, p in zip(before, engine.theta.params))
    for p in engine.theta.params:
        now = engine.optimizer.state.get(p, {})
        assert set(now) == set(state.get(id(p), {}))
        for k, v in now.items():
            assert torch.equal(v, state[id(p)][k]), f"AdamW's {k} moved on a skipped step"


@pytest.mark.parametrize("mode", MODES4, ids=str)
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_step_without_supervised_token_is_nonfinite(mode, nonfinite):
    engine, theta, before, state = _adamw_after_one_step(MODES4[mode], nonfinite)
    empty = [unsupervised(random_batch(theta.config, seed=s)) for s in (5, 6)]
    engine.backward(empty[0])
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="no supervised token"):
            engine.step(empty[1])
    else:
        figures = engine.step(empty[1])
        assert figures["skipped"] == 1.0 and figures["supervised_fraction"] == 0.0
        assert figures["loss"] == 0.0
    _assert_untouched(engine, before, state)


@pytest.mark.parametrize("mode", MODES4, ids=str)
@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_nan_loss_with_finite_gradients_is_nonfinite(mode, nonfinite):
    """A NaN loss whose gradients are finite (a NaN added as a constant) never steps."""
    engine, theta, before, state = _adamw_after_one_step(MODES4[mode], nonfinite)

    def nan_loss(_module, _args, out):
        out.loss = out.loss + torch.tensor(math.nan)
        return out

    theta.register_forward_hook(nan_loss)
    batch = random_batch(theta.config, seed=7)
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="non-finite loss"):
            engine.step(batch)
    else:
        assert engine.step(batch)["skipped"] == 1.0
    _assert_untouched(engine, before, state)


# ---------------------------------------------------------------------- the Trainer

# per optimizer step (2 micro-batches of 2): a step text-only throughout, mixed
# micro-batches, text-only micro-batches; 27 of the 80 examples are text-only
KINDS = ("TTTT" + "ITII" + "IITI" + "IITT" + "IIII" + "IIII") * 3 + "TTII" + "ITII"
STEPS = 20


def _sgd(model, lr: float):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)


@pytest.mark.parametrize("mode", ["mdgd", "gm"])
def test_trainer_survives_a_llava_mix_and_matches_independent_steps(tmp_path, mode):
    from mdgd.integrations.hf import MDGDTrainer

    engine, theta, ref, o_theta, o_ref = build(mode, alpha=0.3)
    cfg, names = engine.config, engine.param_names
    assert len(KINDS) == 4 * STEPS and KINDS.count("T") == 27
    data = MixedExamples(theta.config, KINDS, seed=40)
    lr = 0.05
    trainer = MDGDTrainer(
        model=theta,
        ref_model=ref,
        mdgd_config=cfg,
        args=trainer_args(
            tmp_path, max_steps=STEPS, learning_rate=lr, train_sampling_strategy="sequential"
        ),
        train_dataset=data,
        data_collator=collate,
    )
    trainer.optimizer = _sgd(theta, lr)
    trainer.train()
    assert trainer.engine.step_count == STEPS

    # the same 20 steps, independently: autograd + the float64 reference + SGD by hand
    params = dict(o_theta.named_parameters())
    sizes = [params[n].numel() for n in names]
    fractions = []
    for step in range(STEPS):
        rows = [data[i] for i in range(4 * step, 4 * step + 4)]
        mbs = [collate(rows[:2]), collate(rows[2:])]
        fractions.append(sum("pixel_values" not in b for b in mbs) / 2)
        bufs, _ = independent(o_theta, o_ref, names, mbs, cfg)
        want = reference_direction(*bufs, sizes, mode=mode, alpha=cfg.alpha)
        with torch.no_grad():
            for n, d in zip(names, torch.split(want.direction, sizes)):
                params[n].sub_(lr * d.view_as(params[n]).float())
    assert 0 < sum(fractions) < STEPS and 1.0 in fractions
    for n in names:
        got, exp = dict(theta.named_parameters())[n], params[n]
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5, msg=prefixed(n))
    logged = [h for h in trainer.state.log_history if "mdgd/text_only_fraction" in h]
    assert [h["mdgd/text_only_fraction"] for h in logged] == fractions


# ---------------------------------------------------------------------- two processes


def test_data_parallel_rank_with_text_only_micro_batches(tmp_path):
    """A rank whose micro-batch is text-only skips the h backward while the other
    all-reduces h buckets from its hooks: no hang, and the union of the ranks'
    micro-batches in one process gives the same parameters and figures."""
    import dist_mix_worker as w
    from launch import launch_ranks

    launch_ranks([w.__file__, str(tmp_path)], 180, "dist_mix_worker")
    ranks = [torch.load(tmp_path / f"mix-{r}.pt") for r in range(2)]
    for mode in w.MODES:
        theta, engine = w.mix_engine(mode, "none")
        want = []
        for s in range(w.STEPS):
            engine.backward(w.mix_batch(theta.config, 0, s))
            want.append(engine.step(w.mix_batch(theta.config, 1, s)))
        flat = w.flat_params(theta, engine)
        for params, figures in (r[mode] for r in ranks):
            torch.testing.assert_close(params, flat, rtol=1e-5, atol=1e-6)
            assert [f["text_only_fraction"] for f in figures] == [0.5, 0.5, 1.0]
            for got, exp in zip(figures, want):
                assert got["loss_v"] == pytest.approx(exp["loss_v"], rel=1e-5)
