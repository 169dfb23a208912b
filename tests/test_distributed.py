"""Multi-process MDGD: 2 gloo processes on CPU against one process on the union of batches.

Each launch runs ``tests/dist_worker.py`` twice (RANK 0 and 1, torchrun's
variables) and batches many cases into one launch; the parent compares the
files the ranks write. The single-process reference is the engine with one
micro-batch per rank (gradient accumulation of ``world`` micro-batches).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from dist_worker import (
    CASES,
    STEPS,
    batch_for,
    case_id,
    models,
    optimizer_for,
    patterns,
)
from llava_tiny import one_thread  # noqa: F401  (fixture)

from mdgd import FIGURES, MDGDConfig, MDGDEngine, mark_trainable
from mdgd.buffers import segment_layout
from mdgd.distributed import pieces, shard_range

WORLD = 2
HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out, timeout: float = 120.0) -> None:
    """Run the 2 ranks of ``scenario``; fail (never hang) when one fails or overruns."""
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, os.path.join(HERE, "dist_worker.py"), scenario, str(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} of {scenario!r} failed:\n{log[-4000:]}"


def reference(case):
    """One process, one micro-batch per rank: the union of the ranks' batches."""
    mode, _, extra, optim = case
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    opt = optimizer_for(optim)([p for p in theta.parameters() if p.requires_grad])
    cfg = MDGDConfig(mode=mode, trainable=pats, distributed="none", **extra)
    engine = MDGDEngine(theta, ref, opt, cfg)
    figures = []
    for step in range(STEPS):
        for rank in range(WORLD - 1):
            engine.backward(batch_for(theta.config, rank, step))
        figures.append(engine.step(batch_for(theta.config, WORLD - 1, step)))
    params = dict(theta.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1).double() for n in engine.param_names])
    return flat, figures, engine


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("steps")
    launch("steps", out, timeout=240)
    return [torch.load(out / f"steps-{r}.pt") for r in range(WORLD)]


def test_shard_boundary_straddles_a_segment_and_needs_padding():
    theta, ref = models()
    named = mark_trainable(theta, patterns(theta))
    sizes = [p.numel() for _, p in named]
    n = sum(sizes)
    lo, hi, padded = shard_range(n, WORLD, 0)
    assert n % WORLD == 1 and padded == n + 1, "the test model should need padding"
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    assert hi not in offsets, "the shard boundary should fall inside a parameter"
    for gran in ("tensor", "block:700"):
        segs = segment_layout([nm for nm, _ in named], sizes, 700, gran).sizes
        first = pieces(segs, *shard_range(n, WORLD, 0)[:2])
        second = pieces(segs, *shard_range(n, WORLD, 1)[:2])
        assert first[0][-1] == second[0][0], f"{gran}: no segment straddles the boundary"
        assert sum(first[2]) + sum(second[2]) == n


def test_pieces_cover_the_range_in_order():
    sizes = [5, 1, 7, 3]
    for world in (1, 2, 3, 5, 17):
        covered = []
        for r in range(world):
            lo, hi, padded = shard_range(sum(sizes), world, r)
            assert padded % world == 0 and padded >= sum(sizes)
            seg, start, length = pieces(sizes, lo, hi)
            covered += [(s, lo + a, m) for s, a, m in zip(seg, start, length)]
        flat = [s for s, _, m in covered for _ in range(m)]
        assert flat == [s for s, n in enumerate(sizes) for _ in range(n)]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_two_ranks_equal_one_process_on_the_union(step_results, case):
    key = case_id(case)
    (p0, f0, early0), (p1, f1, early1) = step_results[0][key], step_results[1][key]
    if case[2].get("dist_bucket_mb"):  # small buckets: sent from the hooks, mid-backward
        assert early0 > 0 and early0 == early1, f"{key}: {early0}, {early1} early buckets"
    # every rank ends with the same parameters, bit for bit
    assert torch.equal(p0, p1), f"{key}: the ranks' parameters differ"
    want, want_figs, engine = reference(case)
    initial = dict(models()[0].named_parameters())
    start = torch.cat([initial[n].detach().reshape(-1).double() for n in engine.param_names])
    assert not torch.equal(want, start), "the reference did not move"
    torch.testing.assert_close(p0, want, rtol=1e-5, atol=2e-6, msg=key)
    for step, (got, exp) in enumerate(zip(f0, want_figs)):
        torch.testing.assert_close(
            torch.tensor([got[k] for k in FIGURES]),
            torch.tensor([f1[step][k] for k in FIGURES]),
            rtol=0,
            atol=0,
            equal_nan=True,
            msg=f"{key}: figures differ between ranks at step {step}",
        )
        for name in FIGURES:
            torch.testing.assert_close(
                torch.tensor(got[name]),
                torch.tensor(exp[name]),
                rtol=1e-4,
                atol=1e-5,
                equal_nan=True,
                msg=f"{key} step {step}: {name}",
            )


def test_sharded_equals_data_parallel(step_results):
    res = step_results[0]
    pairs = 0
    for case in CASES:
        mode, dmode, extra, optim = case
        if dmode != "sharded":
            continue
        twin = (mode, "dp", extra, optim)
        if twin in CASES:
            torch.testing.assert_close(
                res[case_id(case)][0], res[case_id(twin)][0], rtol=1e-5, atol=1e-6
            )
            pairs += 1
    assert pairs >= 5


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


def test_missing_rank_times_out_instead_of_hanging(tmp_path):
    launch("timeout", tmp_path, timeout=60)
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


@pytest.mark.parametrize("dmode", ["auto", "dp", "sharded"])
def test_one_rank_group_equals_no_group(one_rank_group, dmode):
    """With one rank every mode is the single-process engine ("auto" resolves to none)."""
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    factory = optimizer_for("adamw")
    params = [p for p in theta.parameters() if p.requires_grad]
    opt = factory if dmode == "sharded" else factory(params)
    engine = MDGDEngine(
        theta, ref, opt, MDGDConfig(mode="gm", alpha=0.3, trainable=pats, distributed=dmode)
    )
    assert engine.dist_mode == ("none" if dmode == "auto" else dmode)
    for step in range(2):
        engine.backward(batch_for(theta.config, 0, step))
        engine.step(batch_for(theta.config, 1, step))
    got = torch.cat([p.detach().reshape(-1).double() for p in engine.theta.params])
    t2, r2 = models()
    mark_trainable(t2, pats)
    opt2 = factory([p for p in t2.parameters() if p.requires_grad])
    ref_engine = MDGDEngine(
        t2, r2, opt2, MDGDConfig(mode="gm", alpha=0.3, trainable=pats, distributed="none")
    )
    for step in range(2):
        ref_engine.backward(batch_for(t2.config, 0, step))
        ref_engine.step(batch_for(t2.config, 1, step))
    want = torch.cat([p.detach().reshape(-1).double() for p in ref_engine.theta.params])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    if dmode == "sharded":
        with pytest.raises(NotImplementedError, match="sharded"):
            engine.save_checkpoint("unused")


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
        lambda p: engine.dist._ready(0, last)
    )
    with pytest.raises(RuntimeError, match="received its gradient twice"):
        engine.step(batch_for(theta.config, 0, 0))
