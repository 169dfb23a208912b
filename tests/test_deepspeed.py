"""MDGD on DeepSpeed ZeRO-2 and ZeRO-3: 2 gloo ranks on CPU (``DS_ACCELERATOR=cpu``)
against one process on the union of the ranks' micro-batches.

One launch of ``tests/helpers/ds_worker.py`` runs every case of its ``CASES`` on
DeepSpeed engines (:func:`mdgd.deepspeed_models`) and records the state before
every step (the fp32 parameters and the optimizer's moments, gathered through
DeepSpeed's public API); the one-process reference runs each step from that
state, and the run's next state must match it within the bound that
tests/helpers/tolerances.py derives from float32 arithmetic (as the FSDP2 tests).

DeepSpeed's first initialisation in a fresh environment JIT-compiles its
shared-memory op (about 150 s on 2 cores, cached under ~/.cache/torch_extensions
for the launches that follow): the launch's timeout allows for it.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

pytest.importorskip("deepspeed", reason="the DeepSpeed tests need deepspeed (the test extra)")

from dist_faults import assert_fault_handled  # noqa: E402
from dist_worker import batch_for, models, optimizer_for, patterns  # noqa: E402
from ds_worker import CASES, STEPS, TEXT_ONLY, case_id, mdgd_config  # noqa: E402
from launch import WORLD, free_port, launch_ranks  # noqa: E402
from llava_tiny import one_thread  # noqa: E402, F401  (fixture)
from step_check import assert_step_matches, reference_step  # noqa: E402
from test_distributed import assert_figures  # noqa: E402
from tolerances import U32  # noqa: E402

from mdgd import MDGDEngine, mark_trainable  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]
HERE = os.path.dirname(os.path.abspath(__file__))
# the first launch may JIT-compile DeepSpeed's op (~150 s); then 10 cases x 3 steps
LAUNCH_TIMEOUT = 900


def launch_ds(scenario: str, out, timeout: float = LAUNCH_TIMEOUT) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    worker = os.path.join(HERE, "helpers", "ds_worker.py")
    launch_ranks([worker, scenario, str(out)], timeout=timeout, what=f"ds_worker {scenario}")


@pytest.fixture(scope="module")
def ds_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed")
    launch_ds("steps", out)
    return [torch.load(out / f"steps-{r}.pt") for r in range(WORLD)]


def reference(case, states: list[dict], grad_diff: list[torch.Tensor]) -> list[dict]:
    """One process on the union of the ranks' micro-batches, each step from the run's
    state before it; ``grad_diff``: the run's measured per-step difference of its own
    micro-batch gradients from plain torch's (``ds_worker.grad_difference``)."""
    stage, mode, extra, optim, micro, clip = case
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    opt = optimizer_for(optim)([p for p in theta.parameters() if p.requires_grad])
    engine = MDGDEngine(theta, ref, opt, mdgd_config(case, pats))
    ranks = [(r, m) for r in range(WORLD) for m in range(micro)]
    return [
        reference_step(
            engine,
            [batch_for(theta.config, r, step, m, TEXT_ONLY) for r, m in ranks],
            states[step],
            world=WORLD,
            micro=micro,
            # ZeRO-3: each rank sums its partitions' pieces, then one all-reduce;
            # ZeRO-2: every rank computes the statistics from whole buffers
            pieces=WORLD if stage == 3 else 1,
            grad_diff=grad_diff[step],
        )
        for step in range(STEPS)
    ]


def with_clipping(ref: dict) -> dict:
    """Widen the bound for a step the engine clipped: the clipped direction is ``c d`` with
    ``c = max / (||d|| + 1e-6)``; a run's ``c'`` differs through ``||d'|| - ||d||``, at most
    ``||dg||`` (triangle inequality) plus the norm's own float32 summation (N roundings),
    so ``|c d - c' d'| <= dg + |c d| (||dg|| / ||c d|| + N u)`` to first order."""
    d = ref["direction"].double()
    dg = torch.where(torch.isfinite(ref["dg"]), ref["dg"], 0.0)
    rel = dg.norm() / d.norm() + d.numel() * U32
    out = dict(ref)
    out["dg"] = ref["dg"] + d.abs() * rel
    return out


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_deepspeed_equals_one_process_on_the_union(ds_results, case):
    key = case_id(case)
    r0, r1 = ds_results[0][key], ds_results[1][key]
    stage, mode, _, _, micro, clip = case
    if mode != "ft":
        assert r0["ref_same"] and r1["ref_same"], f"{key}: ref_model changed"
    for step, (a, b) in enumerate(zip(r0["states"], r1["states"])):
        assert torch.equal(a["params"], b["params"]), f"{key}: the ranks differ after {step} steps"
    assert not torch.equal(r0["states"][0]["params"], r0["states"][-1]["params"]), key
    if mode != "ft":  # step 1's first micro-batch was text-only on both ranks
        assert r0["figures"][1]["text_only_fraction"] == 1 / micro
    if stage == 2:  # ZeRO-2 computes every micro-batch's gradient as plain torch does
        assert all(d.max() == 0 for d in r0["grad_diff"]), f"{key}: {r0['grad_diff']}"
    refs = reference(case, r0["states"], r0["grad_diff"])
    if clip:
        refs = [with_clipping(r) for r in refs]
    for step, ref in enumerate(refs):
        assert_step_matches(f"{key} step {step}", r0["states"][step], r0["states"][step + 1], ref)
    assert_figures(key, r0["figures"], r1["figures"], [r["figures"] for r in refs])


def test_zero3_gradient_buffers_are_one_over_world_of_dp(ds_results):
    """Per rank, mdgd's four buffers hold this rank's ZeRO-3 partitions only: together the
    ranks hold exactly dp's four full buffers once, each rank about 1/W of them."""
    for case in CASES:
        stage, mode = case[0], case[1]
        if mode == "ft":
            continue
        key = case_id(case)
        got = [ds_results[r][key]["buffer_bytes"] for r in range(WORLD)]
        total = ds_results[0][key]["global_trainable"]
        dp_bytes = 4 * total * 4  # four full float32 buffers, as "dp" holds on every rank
        if stage == 3:
            assert sum(got) == dp_bytes, (key, got, dp_bytes)
            # each parameter's partition is ceil(numel / W): at most one element over per tensor
            assert max(got) <= math.ceil(dp_bytes / WORLD) + 4 * 4 * 64, (key, got)
        else:  # ZeRO-1/2 read the full gradients: dp's buffers on every rank
            assert got == [dp_bytes] * WORLD, (key, got)


@pytest.fixture(scope="module")
def trainer_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_trainer")
    launch_ds("trainer", out)
    return out, [torch.load(out / f"trainer-{r}.pt") for r in range(WORLD)]


def test_trainer_with_llava_configs_equals_dp_and_resumes(trainer_results):
    """MDGDTrainer with the text of LLaVA's zero3.json and zero2.json trains as in "dp"
    mode; resuming the ZeRO-3 run from its step-2 checkpoint ends where it ended; the
    saved model loads with from_pretrained."""
    from transformers import LlavaForConditionalGeneration

    out, res = trainer_results
    r = res[0]
    assert torch.equal(res[0]["zero3"]["params"], res[1]["zero3"]["params"]), "ranks differ"
    for name in ("zero3", "zero2"):
        assert r[name]["mode"] == "deepspeed"
        assert len(r[name]["logs"]) == 3, r[name]["logs"]
        # same steps as "dp" up to float32 summation order (as the FSDP2 Trainer test)
        torch.testing.assert_close(r[name]["params"], r["dp"]["params"], rtol=1e-5, atol=1e-6)
        for got, want in zip(r[name]["logs"], r["dp"]["logs"]):
            for key in ("loss", "mdgd/loss_v", "mdgd/cos_mean"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    assert "mdgd_state.json" in r["files"] and any(f.startswith("global_step") for f in r["files"])
    assert torch.equal(r["resumed"]["params"], r["zero3"]["params"]), "the resumed run differs"
    assert repr(r["resumed"]["logs"][-1]) == repr(r["zero3"]["logs"][-1])
    model = LlavaForConditionalGeneration.from_pretrained(out / "zero3" / "final")
    params = dict(model.named_parameters())
    loaded = torch.cat([params[n].detach().reshape(-1).double() for n in r["zero3"]["names"]])
    assert torch.equal(loaded, r["zero3"]["params"]), "the saved model is not the trained one"


def test_mdgd_train_deepspeed_zero3_equals_one_process(tmp_path_factory, tmp_path):
    """``mdgd train --deepspeed <LLaVA's zero3.json>`` on 2 gloo ranks, batch 2 each, under
    torchrun and under DeepSpeed's own launcher (``deepspeed --num_gpus 2``, which on CPU
    starts 2 local processes) == one process with 2 micro-batches of 2, both sampled by
    modality (on by default under DeepSpeed). The data are the image samples only: under
    ZeRO-3 the ranks' micro-batches must agree on having images (the text-only error is
    tested with the engine)."""
    import json
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file
    from tiny_checkpoints import build_all, flags, parse
    from tolerances import prefixed

    from mdgd.train import prepare, run

    d = build_all(tmp_path_factory)["llava"]
    rows = json.loads((d / "data.json").read_text())
    data = tmp_path / "images_only.json"
    data.write_text(json.dumps([r for r in rows if "image" in r]))
    zero3 = os.path.join(HERE, "data", "llava_zero3.json")
    common = dict(data=data, max_steps=3, **{"monitor-steps": 2})
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    launchers = {
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + ["--nproc-per-node", "2", "-m", "mdgd"],
        "deepspeed": [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2"]
        + ["--master_port", str(free_port()), shutil.which("mdgd") or "mdgd"],
    }
    for name, launcher in launchers.items():
        argv = flags(d, tmp_path / name, ddp_backend="gloo", ddp_timeout=120, **common)
        cmd = [*launcher, "train", *argv, "--deepspeed", zero3]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, name + proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed turns on LLaVA's modality grouping; its order depends only on the samples
    # per optimizer step (2 ranks x 2 = 2 micro-batches x 2) when no tail is left over
    grouped = {"group-by-modality-length": "true"}
    opts, args = parse(
        flags(d, tmp_path / "one", gradient_accumulation_steps=2, **grouped, **common)
    )
    run(opts, args, prepare(opts, args))
    one = load_file(tmp_path / "one" / "model.safetensors")
    start = load_file(d / "model" / "model.safetensors")
    assert any(not torch.equal(one[k], start[k]) for k in one)
    for name in launchers:
        two = load_file(tmp_path / name / "model.safetensors")
        for k in one:  # up to float32 summation order (as the "dp" mdgd train test)
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=prefixed(k))
        summary = json.loads((tmp_path / name / "train_summary.json").read_text())
        assert summary["figures"]["mdgd/erank"] > 0


def test_engine_checkpoint_resumes_bit_for_bit(tmp_path):
    """engine.save_checkpoint / load_checkpoint on ZeRO-3 and ZeRO-2 (DeepSpeed's own
    checkpoint of the engine, optimizer and scheduler, mdgd's state.pt and RNG files):
    2 steps, save, 2 more == fresh engines loading the checkpoint and running the 2."""
    launch_ds("ckpt", tmp_path)
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"ckpt-{rank}.pt")
        for stage, r in res.items():
            assert r["step_count"] == 2, (stage, r["step_count"])
            assert {"state.pt", "deepspeed"} <= set(r["files"]), r["files"]
            assert torch.equal(r["full"]["params"], r["resumed"]["params"]), stage
            for name, st in r["full"]["moments"].items():
                for k, v in st.items():
                    got = r["resumed"]["moments"][name][k]
                    assert torch.equal(torch.as_tensor(got), torch.as_tensor(v)), (stage, name, k)
            assert repr(r["figures"][0]) == repr(r["figures"][1]), stage


@pytest.mark.parametrize(
    "config, fp16, key",
    [
        ({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}, False, '"fp16"'),
        ({"zero_optimization": {"stage": 3}}, True, '"fp16"'),
        ({"zero_optimization": {"stage": 0}}, False, '"stage": 0'),
        (
            {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
            False,
            '"offload_optimizer"',
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
            False,
            '"offload_param"',
        ),
    ],
    ids=["fp16-config", "fp16-flag", "stage0", "offload-optimizer", "offload-param"],
)
def test_configs_that_cannot_work_name_their_key(config, fp16, key):
    from mdgd.distributed.deepspeed import config_unsupported

    why = config_unsupported(config, fp16)
    assert why is not None and key in why, why


def test_llava_configs_are_accepted():
    from ds_worker import llava_config

    from mdgd.distributed.deepspeed import config_unsupported

    for stage in (2, 3):
        cfg = llava_config(stage)
        cfg["fp16"]["enabled"] = False  # what "auto" becomes without --fp16
        assert config_unsupported(cfg) is None


FAULTS = [(s, n, f) for s in (3, 2) for n in ("skip", "raise") for f in ("grad", "loss")]


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_faults")
    launch_ds("faults", out)
    return [torch.load(out / f"faults-{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", FAULTS, ids=[f"zero{s}-{n}-{f}" for s, n, f in FAULTS])
def test_nan_on_one_rank_skips_or_raises_on_every_rank(faults, case):
    stage, nonfinite, fault = case
    assert_fault_handled([f[case] for f in faults], nonfinite)
