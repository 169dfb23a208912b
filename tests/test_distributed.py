"""Multi-process MDGD: 2 gloo processes on CPU against one process on the union of batches.

Each launch runs ``tests/helpers/dist_worker.py`` twice (RANK 0 and 1, torchrun's
variables) and batches many cases into one launch; the parent compares the
files the ranks write. The single-process reference is the engine with the
ranks' micro-batches as its own (gradient accumulation of ``world x micro``
micro-batches); in the FSDP2 launch the ranks compute those references too,
half each, after their sharded runs. The ranks record their state before every step
and the reference runs each step from that state, so every step is compared within
a bound derived from float32 arithmetic (tests/helpers/step_check.py and
tolerances.py; docs/testing.md, "Tolerances: where the numbers come from").
"""

from __future__ import annotations

import json

import pytest
import torch
from dist_faults import build
from dist_worker import (
    CASES,
    FSDP_CASES,
    PLUGIN_CASE,
    STEPS,
    batch_for,
    case_id,
    fsdp_case_id,
    full_flat,
    models,
    optimizer_for,
    patterns,
    run_fsdp_reference,
)
from launch import WORLD, free_port, launch
from llava_tiny import one_thread  # noqa: F401  (fixture)
from step_check import assert_step_matches, reference_step
from tolerances import prefixed

from mdgd import FIGURES, MDGDConfig, MDGDEngine, mark_trainable, shard_models
from mdgd.distributed.shards import local_pieces

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(case, states: list[dict]) -> list[dict]:
    """One process, one micro-batch per rank (the union of the ranks' batches), each step
    from the ranks' state before it (``step_check.reference_step``)."""
    mode, _, extra, optim = case
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    opt = optimizer_for(optim)([p for p in theta.parameters() if p.requires_grad])
    cfg = MDGDConfig(mode=mode, trainable=pats, distributed="none", **extra)
    engine = MDGDEngine(theta, ref, opt, cfg)
    return [
        reference_step(
            engine,
            [batch_for(theta.config, rank, step) for rank in range(WORLD)],
            states[step],
            world=WORLD,
            micro=1,
            pieces=1,  # "dp": every rank computes the statistics from whole buffers
        )
        for step in range(STEPS)
    ]


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("steps")
    launch("steps", out, timeout=240)
    return [torch.load(out / f"steps-{r}.pt") for r in range(WORLD)]


def assert_steps(key: str, states: list[dict], refs: list[dict]) -> None:
    """The run starts from the models' parameters, moves, and each of its steps matches
    the one-process step from the same state (tests/helpers/tolerances.py's bound)."""
    start = start_params(list(refs[0]["numels"]))
    assert torch.equal(states[0]["params"], start), f"{key}: the run did not start from theta"
    assert not torch.equal(states[-1]["params"], start), f"{key}: the parameters did not move"
    for step, ref in enumerate(refs):
        assert_step_matches(f"{key} step {step}", states[step], states[step + 1], ref)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_two_ranks_equal_one_process_on_the_union(step_results, case):
    key = case_id(case)
    r0, r1 = step_results[0][key], step_results[1][key]
    if case[2].get("dist_bucket_mb"):  # small buckets: sent from the hooks, mid-backward
        early0, early1 = r0["early"], r1["early"]
        assert early0 > 0 and early0 == early1, f"{key}: {early0}, {early1} early buckets"
    # every rank ends every step with the same parameters, bit for bit
    for step, (a, b) in enumerate(zip(r0["states"], r1["states"])):
        assert torch.equal(a["params"], b["params"]), f"{key}: the ranks differ after {step} steps"
    refs = reference(case, r0["states"])
    assert_steps(key, r0["states"], refs)
    assert_figures(key, r0["figures"], r1["figures"], [r["figures"] for r in refs])


def assert_figures(key, f0, f1, want_figs) -> None:
    """The ranks' figures are identical, and close to the one-process reference's."""
    for step, (got, exp) in enumerate(zip(f0, want_figs)):
        torch.testing.assert_close(
            torch.tensor([got[k] for k in FIGURES]),
            torch.tensor([f1[step][k] for k in FIGURES]),
            rtol=0,
            atol=0,
            equal_nan=True,
            msg=prefixed(f"{key}: figures differ between ranks at step {step}"),
        )
        for name in FIGURES:
            torch.testing.assert_close(
                torch.tensor(got[name]),
                torch.tensor(exp[name]),
                rtol=1e-4,
                atol=1e-5,
                equal_nan=True,
                msg=prefixed(f"{key} step {step}: {name}"),
            )


def test_disagreeing_ranks_fail_fast_on_every_rank(tmp_path):
    launch("bad", tmp_path, timeout=90)
    msgs = [json.loads((tmp_path / f"bad-{r}.json").read_text()) for r in range(WORLD)]
    expect = {
        "trainable": "trainable parameter names and shapes",
        "layout": "segment layout",
        "mode": "MDGDConfig",
        "dist_mode": "distributed mode",
        "ddp": "unwrapped model",
        "micro_batches": "same number of micro-batches",
    }
    for rank, m in enumerate(msgs):
        for key, text in expect.items():
            assert text in m[key], f"rank {rank}, {key}: {m[key]}"
    assert "rank 1" in msgs[0]["trainable"] and "elements" in msgs[0]["trainable"]
    # rank 1 ran no h backward while rank 0's hooks sent h buckets: no hang, same result
    assert msgs[0]["no_h_backward"] == msgs[1]["no_h_backward"]


@pytest.mark.parametrize("scenario", ["timeout", "timeout_fsdp"])
def test_missing_rank_times_out_instead_of_hanging(tmp_path, scenario):
    launch(scenario, tmp_path, timeout=60)
    got = json.loads((tmp_path / "timeout-0.json").read_text())
    assert "did not check in" in got["message"], got["message"]
    assert got["seconds"] < 10


def test_trainer_under_two_processes(tmp_path):
    launch("trainer", tmp_path, timeout=180)
    res = [torch.load(tmp_path / f"trainer-{r}.pt") for r in range(WORLD)]
    assert torch.equal(res[0]["params"], res[1]["params"]), "the ranks diverged"
    assert not torch.equal(res[0]["params"], res[0]["start"]), "nothing was trained"
    for r in res:
        assert r["dist_mode"] == "dp"
        assert r["wrapped"] == "LlavaForConditionalGeneration", r["wrapped"]
        assert r["ref_unchanged"]
        logs = [h for h in r["logs"] if "loss" in h]
        assert len(logs) == 3
        for h in logs:
            for key in FIGURES:
                assert f"mdgd/{key}" in h, key
            assert h["mdgd/skipped"] == 0.0
            assert 0.0 < h["mdgd/loss_v"] < 10.0


# ---------------------------------------------------------------------- FSDP2


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    launch("fsdp", out, timeout=400)
    return [torch.load(out / f"fsdp-{r}.pt") for r in range(WORLD)]


def start_params(names) -> torch.Tensor:
    initial = dict(models()[0].named_parameters())
    return torch.cat([initial[n].detach().reshape(-1).double() for n in names])


@pytest.mark.parametrize("case", FSDP_CASES, ids=[fsdp_case_id(c) for c in FSDP_CASES])
def test_fsdp_equals_one_process_on_the_union(fsdp_results, case):
    """3 steps under FSDP2 on 2 ranks: each one = one process's step on both ranks'
    micro-batches from the same state."""
    key = fsdp_case_id(case)
    r0, r1 = (r["cases"][key] for r in fsdp_results)
    refs = next(r["refs"][key] for r in fsdp_results if key in r["refs"])
    assert r0["ref_same"] and r1["ref_same"], f"{key}: ref_model changed"
    for step, (a, b) in enumerate(zip(r0["states"], r1["states"])):
        assert torch.equal(a["params"], b["params"]), f"{key}: the ranks differ after {step} steps"
    if case[0] != "ft":  # step 1's first micro-batch was text-only (FSDP_TEXT_ONLY)
        assert r0["figures"][1]["text_only_fraction"] == 1 / case[2]
    assert_steps(key, r0["states"], refs)
    assert_figures(key, r0["figures"], r1["figures"], [r["figures"] for r in refs])


def test_fsdp_keeps_no_full_size_gradient(fsdp_results):
    """Per rank: 4 buffers of the local shards, and every .grad is a view into them."""
    locals_ = []
    for rank, res in enumerate(fsdp_results):
        st = res["storage"]
        assert st["buffer_bytes"] == 4 * st["local_trainable"] * st["itemsize"], (rank, st)
        assert st["h_inside"] and st["g_inside"], (rank, st)
        assert st["other_grads"] == 0, (rank, st)
        locals_.append(st["local_trainable"])
    total = fsdp_results[0]["storage"]["global_trainable"]
    assert sum(locals_) == total and max(locals_) <= total // WORLD + 64, locals_


@pytest.fixture(scope="module")
def fsdp_bad_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_bad")
    launch("fsdp_bad", out, timeout=180)
    return out


def test_fsdp_models_wrapped_differently_fail_on_every_rank(fsdp_bad_dir):
    tmp_path = fsdp_bad_dir
    expect = {
        "units": "sharded differently",
        "one_wrapped": "is wrapped by FSDP2 (fully_shard) but ref_model is not",
        "dp_on_fsdp": "use distributed='fsdp'",
        "fsdp_unwrapped": "shard_models",
        "mixed_text_only": "1 of 2 ranks have a text-only one",
    }
    for rank in range(WORLD):
        msgs = json.loads((tmp_path / f"fsdp_bad-{rank}.json").read_text())
        for key, text in expect.items():
            assert text in msgs[key], f"rank {rank}, {key}: {msgs[key]}"
        assert msgs["good_mode"] == "fsdp"


def test_fsdp_phi_wrapped_like_an_accelerate_plugin_theta(fsdp_bad_dir):
    """theta wrapped by accelerate's own FSDP2 preparation, phi by shard_like: equal to
    one process (the Trainer's accelerate-plugin path, as far as a CPU allows)."""
    (s0, f0, mode, units), (s1, f1, _, _) = (
        torch.load(fsdp_bad_dir / f"plugin-{r}.pt") for r in range(WORLD)
    )
    assert mode == "fsdp" and len(units) > 4, units
    # accelerate 1.14 began wrapping [final norm, lm_head] in a unit of their own;
    # before it lm_head stays in the root unit
    import accelerate

    if tuple(int(x) for x in accelerate.__version__.split(".")[:2]) >= (1, 14):
        assert "lm_head" in units, units
    assert torch.equal(s0[-1]["params"], s1[-1]["params"])
    refs = run_fsdp_reference(PLUGIN_CASE, WORLD, s0)
    assert_steps("plugin", s0, refs)
    assert_figures("plugin", f0, f1, [r["figures"] for r in refs])


def test_fsdp_checkpoint_resumes_bit_for_bit(tmp_path):
    launch("fsdp_ckpt", tmp_path, timeout=180)
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"fsdp_ckpt-{rank}.pt")
        assert res["step_after_load"] == 2
        assert repr(res["figures_resumed"]) == repr(res["figures_full"])  # bit-exact floats
        assert torch.equal(res["params_resumed"], res["params_full"]), f"rank {rank} diverged"
        assert res["same_optimizer_state"], f"rank {rank}: optimizer state differs"
        assert {"dcp-0", "state.pt", f"rng-{rank}-0.pt"} <= set(res["files"]), res["files"]


def test_trainer_on_fsdp2_equals_dp_and_resumes(tmp_path):
    launch("trainer_fsdp", tmp_path, timeout=300)
    res = [torch.load(tmp_path / f"trainer_fsdp-{r}.pt") for r in range(WORLD)]
    for key in ("dp", "fsdp", "resumed"):
        assert repr(res[0][key]["logs"]) == repr(res[1][key]["logs"]), f"{key}: ranks' logs differ"
        assert torch.equal(res[0][key]["params"], res[1][key]["params"]), key
    r = res[0]
    assert (r["dp"]["mode"], r["fsdp"]["mode"]) == ("dp", "fsdp")
    dp_logs, fsdp_logs = r["dp"]["logs"], r["fsdp"]["logs"]
    assert len(fsdp_logs) == 3
    for got, want in zip(fsdp_logs, dp_logs):
        for key in ["loss", "grad_norm"] + [f"mdgd/{k}" for k in FIGURES]:
            torch.testing.assert_close(
                torch.tensor(got[key]),
                torch.tensor(want[key]),
                rtol=1e-5,
                atol=1e-6,
                equal_nan=True,
                msg=prefixed(key),
            )
    torch.testing.assert_close(r["fsdp"]["params"], r["dp"]["params"], rtol=1e-5, atol=1e-6)
    assert {"mdgd_fsdp", "scheduler.pt", "mdgd_trainable.safetensors"} <= set(r["files"])
    # resumed at step 2: the third step's log and the final parameters match
    assert torch.equal(r["resumed"]["params"], r["fsdp"]["params"]), "the resumed run differs"
    assert repr(r["resumed"]["logs"][-1]) == repr(fsdp_logs[-1])


# ---------------------------------------------------------------------- in one process


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"distributed": "ddp"}, "distributed"),
        ({"dist_timeout_s": 0}, "dist_timeout_s"),
        ({"dist_bucket_mb": -1}, "dist_bucket_mb"),
    ],
)
def test_config_rejects_bad_distributed_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MDGDConfig(**kwargs)


def test_dp_without_a_process_group_says_what_to_do():
    theta, ref = models()
    cfg = MDGDConfig(trainable=patterns(theta), distributed="dp")
    with pytest.raises(ValueError, match="init_process_group"):
        MDGDEngine(theta, ref, None, cfg)


def test_segment_combine_equals_the_direction_op():
    import mdgd_kernels
    from mdgd_kernels.coeffs import coefficients

    gen = torch.Generator().manual_seed(0)
    sizes = [7, 130, 1, 64]
    bufs = [torch.randn(sum(sizes), generator=gen) for _ in range(4)]
    want = bufs[0].clone()
    mdgd_kernels.mdgd_direction_(want, *bufs[1:], sizes, mode="mdgd")
    layout = mdgd_kernels.get_layout(sizes, "cpu")
    stats = mdgd_kernels.segment_gram(*bufs, layout)
    coef = coefficients(stats, layout.sizes_t, mode="mdgd")
    got = bufs[0].clone()
    mdgd_kernels.segment_combine_(got, *bufs[1:], sizes, coef.coeffs)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"expected \[S, 4\]"):
        mdgd_kernels.segment_combine_(got, *bufs[1:], sizes, coef.coeffs[:2])
    with pytest.raises(ValueError, match="float32"):
        mdgd_kernels.segment_combine_(got, *bufs[1:], sizes, coef.coeffs.double())


@pytest.fixture
def one_rank_group():
    import datetime

    import torch.distributed as dist

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def one_rank_run(dmode: str) -> torch.Tensor:
    """2 steps of 2 micro-batches (MDGD-GM, AdamW); the final trainable parameters."""
    theta, engine = build(dmode, mode="gm", alpha=0.3)
    assert engine.distributed == {"auto": "none"}.get(dmode, dmode)
    for step in range(2):
        engine.backward(batch_for(theta.config, 0, step))
        engine.step(batch_for(theta.config, 1, step))
    return full_flat(theta, engine.param_names)


@pytest.mark.parametrize("dmode", ["auto", "dp", "fsdp"])
def test_one_rank_group_equals_no_group(one_rank_group, dmode):
    """With one rank every mode is the single-process engine ("auto" resolves to none)."""
    got = one_rank_run(dmode)
    torch.testing.assert_close(got, one_rank_run("none"), rtol=1e-6, atol=1e-7)


def test_fsdp_refuses_a_grad_scaler(one_rank_group):
    theta, ref = models()
    mark_trainable(theta, patterns(theta))
    shard_models(theta, ref)
    with pytest.raises(ValueError, match="GradScaler.*bf16"):
        MDGDEngine(theta, ref, None, MDGDConfig(), scaler=torch.amp.GradScaler("cpu"))


def test_sharded_mode_is_retired_in_favour_of_fsdp2():
    with pytest.raises(ValueError, match="removed.*FSDP2.*shard_models"):
        MDGDConfig(distributed="sharded")


def test_local_pieces_cover_every_shard_in_order():
    """Segments (blocks of 5) cut against Shard(0) pieces of three parameters."""
    numels = [12, 1, 9]  # rows x cols: 4x3, 1x1, 3x3
    cols = [3, 1, 3]
    sizes = [5, 5, 2, 1, 5, 4]  # "block:5" of each parameter
    for world in (1, 2, 3):
        covered = []
        for rank in range(world):
            ranges = []
            for n, c in zip(numels, cols):
                rows = n // c
                per = -(-rows // world)
                r0 = min(rank * per, rows)
                ranges.append((r0 * c, min(r0 + per, rows) * c))
            seg, start, length = local_pieces(sizes, numels, ranges)
            assert start == [sum(length[:i]) for i in range(len(length))]
            assert sum(length) == sum(b - a for a, b in ranges)
            assert all(m > 0 for m in length)
            flat_pos = [p + x for p, (a, b) in zip([0, 12, 13], ranges) for x in range(a, b)]
            covered += list(zip(flat_pos, [s for s, m in zip(seg, length) for _ in range(m)]))
        owner = [s for s, n in enumerate(sizes) for _ in range(n)]
        assert sorted(covered) == list(enumerate(owner)), world


def test_a_gradient_accumulated_twice_in_one_backward_is_refused(one_rank_group):
    """A parameter whose gradient hook fires twice in the last backward (its bucket may
    be on the wire already) raises instead of reducing a half-written bucket."""
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    opt = torch.optim.SGD([p for p in theta.parameters() if p.requires_grad], lr=0.1)
    engine = MDGDEngine(theta, ref, opt, MDGDConfig(trainable=pats, distributed="dp"))
    last = len(engine.theta.params) - 1
    # a second report of theta's last parameter, as reentrant checkpointing could give
    engine.theta.params[last].register_post_accumulate_grad_hook(
        lambda p: engine.exchange._ready(0, last)
    )
    with pytest.raises(RuntimeError, match="received its gradient twice"):
        engine.step(batch_for(theta.config, 0, 0))
