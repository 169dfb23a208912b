"""``mdgd train --fsdp``: MDGD's own FSDP2 path (2 gloo ranks under torchrun, CPU, offline).

The same flags run twice on the tiny LLaVA checkpoint, once data-parallel and once with
``--fsdp full_shard --fsdp_config '{"fsdp_version": 2}'``: the summary's per-rank bytes
show the sharding (each rank holds its FSDP2 shards, computed here from the model's
shapes), and the trained models and losses equal the data-parallel run's. The refusals
run in one process (they come before any model is loaded).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
from llava_tiny import one_thread  # noqa: F401  (fixture)
from tiny_checkpoints import IMAGE_SIZES, flags, parse, save_tiny_model, write_dataset

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from tolerances import prefixed  # noqa: E402
from transformers import AutoModelForImageTextToText, TrainingArguments  # noqa: E402

from mdgd.distributed import trainer as launch  # noqa: E402
from mdgd.train import SUMMARY_NAME, TrainError, main, mdgd_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2
FSDP = ["--fsdp", "full_shard", "--fsdp_config", '{"fsdp_version": 2}']
STEPS, LR, MOMENTUM = 3, 1e-2, 0.9


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny LLaVA checkpoint and a 4-sample dataset: single-turn questions about a
    picture, so every sample has an image (under FSDP2 the ranks' micro-batches must agree
    on that) and the same token counts."""
    d = tmp_path_factory.mktemp("llava")
    write_dataset(d, IMAGE_SIZES["llava"])
    save_tiny_model("llava", d / "model")
    rows = json.loads((d / "data.json").read_text())
    four = [r for r in rows if "image" in r and len(r["conversations"]) == 2][:4]
    (d / "four.json").write_text(json.dumps(four))
    return d


def torchrun(argv: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    """``mdgd train`` on 2 gloo ranks (``ok``: asserted to succeed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc-per-node", str(WORLD), "-m", "mdgd", "train", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 or not ok, (proc.stdout + proc.stderr)[-4000:]
    return proc


@pytest.mark.slow  # one 2-rank run of 12 steps: about 30 s
def test_fsdp_trains_a_mixed_epoch_grouped_by_modality(tiny, tmp_path):
    """47 samples, 32 with an image and 15 text-only, one epoch: under FSDP2 the sampler
    groups by modality by default, so every micro-step's ranks agree on having images
    (else every rank raises); the text-only group is padded by one repeat to a multiple of
    2 ranks x batch 2, so the epoch is (32 + 16) / 4 = 12 steps."""
    d = tiny
    rows = json.loads((d / "data.json").read_text())
    text = [i for i, r in enumerate(rows) if "image" not in r]
    assert (len(rows), len(text)) == (48, 16)
    del rows[text[0]]
    (tmp_path / "mixed.json").write_text(json.dumps(rows))
    common = dict(data=tmp_path / "mixed.json", max_steps=None, num_train_epochs=1)
    common.update({"ddp_backend": "gloo", "ddp_timeout": 120, "monitor-steps": 0})
    torchrun(flags(d, tmp_path / "out", **common) + FSDP)
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert summary["steps"] == 12
    assert (summary["samples"], summary["text_only_samples"]) == (47, 15)
    # without the grouping the Trainer's random order mixes them: every rank stops with
    # an error that names the flag
    argv = flags(d, tmp_path / "mixed", **common, **{"group-by-modality-length": "false"})
    proc = torchrun(argv + FSDP, ok=False)
    assert proc.returncode != 0
    assert "must all have images or all be text-only" in proc.stderr
    assert "--group-by-modality-length" in proc.stderr


def local_numel(shape: torch.Size, rank: int, world: int) -> int:
    """Elements of ``rank``'s FSDP2 shard: ``Shard(0)`` cuts dim 0 as ``torch.chunk`` does,
    ``ceil(d0 / world)`` rows per rank, the last ranks fewer (or none)."""
    rows = -(-shape[0] // world)
    return max(0, min(rows, shape[0] - rank * rows)) * math.prod(shape[1:])


def expected_bytes(
    shapes: dict, trainable: list[str], rank: int, world: int, lean: bool = False
) -> dict:
    """What ``rank`` holds of the float32 models: both models' parameters (``lean``: phi
    shares theta's frozen ones, :func:`mdgd.reference_model`), the 4 gradient buffers (g
    and h of theta and phi) of the trainable ones and SGD's momentum of them."""
    every = sum(local_numel(s, rank, world) for s in shapes.values())
    train = sum(local_numel(shapes[n], rank, world) for n in trainable)
    params = 4 * (every + train) if lean else 2 * 4 * every
    return {"params": params, "grad_buffers": 4 * 4 * train, "optimizer": 4 * train}


@pytest.mark.slow  # two 2-rank runs: 35-50 s on a busy 2-core CPU
def test_fsdp_shards_and_equals_data_parallel(tiny, tmp_path):
    """Every step trains on all four samples (2 ranks x batch 2), so the sampler's order
    (the modality-grouped one under FSDP2, the Trainer's own in dp) does not matter; the
    samples' equal token counts make the micro-batch pairing irrelevant to the averaged
    losses too."""
    d = tiny
    common = dict(data=d / "four.json", max_steps=STEPS, save_strategy="steps", save_steps=STEPS)
    common.update(optim="sgd", optim_args=f"momentum={MOMENTUM}", learning_rate=LR)
    common.update({"ddp_backend": "gloo", "ddp_timeout": 120, "monitor-steps": 0})
    torchrun(flags(d, tmp_path / "dp", **common))
    proc = torchrun(flags(d, tmp_path / "fsdp", **common) + FSDP)
    printed = proc.stdout + proc.stderr
    s = {k: json.loads((tmp_path / k / SUMMARY_NAME).read_text()) for k in ("dp", "fsdp")}
    config = json.loads((tmp_path / "fsdp" / "mdgd_config.json").read_text())
    assert config["distributed"] == "fsdp"
    assert s["dp"]["memory"]["mode"] == "dp" and s["fsdp"]["memory"]["mode"] == "fsdp"
    assert "MiB held per rank (fsdp): rank 0: parameters" in printed

    # (a) it shards: each rank holds its FSDP2 shards of both models (phi sharded on its
    # own, so with copies of the frozen modules it shares with theta under dp), dp ranks
    # everything (phi sharing theta's frozen modules: mdgd.reference_model)
    model = AutoModelForImageTextToText.from_pretrained(d / "model")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    trainable = sorted(load_file(tmp_path / "fsdp" / "mdgd_trainable.safetensors"))
    assert 0 < len(trainable) < len(shapes)
    dp, fsdp = s["dp"]["memory"]["per_rank"], s["fsdp"]["memory"]["per_rank"]
    assert len(dp) == len(fsdp) == WORLD
    whole = [expected_bytes(shapes, trainable, 0, 1, lean) for lean in (False, True)]
    for rank in range(WORLD):
        assert dp[rank] == whole[1], rank
        assert fsdp[rank] == expected_bytes(shapes, trainable, rank, WORLD), rank
    for key in ("params", "grad_buffers", "optimizer"):  # the shards partition the whole
        assert sum(b[key] for b in fsdp) == whole[0][key], key
    for key in ("grad_buffers", "optimizer"):  # about half (odd dim 0: rank 0 more)
        assert fsdp[0][key] < 0.51 * dp[0][key], key

    # (b) it trains as dp. Both runs see the same samples and, in float32, the same reduced
    # gradients (the mean of 2 ranks is exact in either order). What differs is the order
    # of the sums behind MDGD's per-tensor statistics (FSDP2: a partial sum over each
    # rank's shard, then an all-reduce) and behind the clipping norm: a reordered float32
    # sum of n terms is off by about sqrt(n) * u relatively (u = 2**-24; n * u at worst),
    # n at most the largest trainable tensor, and so are the coefficients and the clip
    # factor. The clipped direction's elements are at most 1 (max_grad_norm 1.0), made of
    # 2 terms (g and h). SGD with momentum is linear in the directions, 3 steps weigh them
    # 1 + 1.9 + 2.71 (AdamW would divide each error by a moment that can be near 0, so no
    # such bound holds for it); each step rounds the parameter once more (rtol).
    n = max(math.prod(shapes[k]) for k in trainable)
    weights = sum(sum(MOMENTUM**j for j in range(t + 1)) for t in range(STEPS))
    atol = LR * weights * 2 * math.sqrt(n) * 2**-24  # 3.0e-7 here; measured 3.7e-9
    start = load_file(d / "model" / "model.safetensors")
    a = load_file(tmp_path / "dp" / "model.safetensors")
    b = load_file(tmp_path / "fsdp" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=STEPS * 2**-23, atol=atol, msg=prefixed(k))
    logs = {}
    for k in ("dp", "fsdp"):
        folder = tmp_path / k / f"checkpoint-{STEPS}"
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        logs[k] = [h["loss"] for h in history if "loss" in h]
    assert len(logs["dp"]) == STEPS
    # the ranks' micro-batches pair the samples differently: equal up to rounding at step 1
    assert logs["fsdp"] == pytest.approx(logs["dp"], rel=1e-6)
    assert os.path.isdir(tmp_path / "fsdp" / f"checkpoint-{STEPS}" / "mdgd_fsdp")  # sharded


# ---------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "fsdp, config, message",
    [
        ("full_shard", '{"fsdp_version": 1}', "--fsdp_config fsdp_version 1: only FSDP2"),
        ("full_shard offload", '{"fsdp_version": 2}', "--fsdp_config cpu_offload: CPU"),
        (
            "full_shard",
            '{"fsdp_version": 2, "fsdp_activation_checkpointing": true}',
            "--fsdp_config activation_checkpointing: not supported; pass --gradient_checkpointing",
        ),
        ("full_shard", '{"fsdp_version": 2}', "--fsdp needs several processes: launch with"),
        # refused by TrainingArguments itself while the flags are parsed: one line too
        ("hybrid_shard", '{"fsdp_version": 2}', "`fsdp=hybrid_shard`"),
    ],
    ids=["fsdp1", "offload", "activation-checkpointing", "one-process", "fsdp1-only-option"],
)
def test_refused_flags_name_the_flag(tiny, tmp_path, capsys, fsdp, config, message):
    argv = flags(tiny, tmp_path, data=tiny / "four.json")
    assert main(argv + ["--fsdp", fsdp, "--fsdp_config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"mdgd train: error: {message}"), err[-1]


def test_fsdp_with_deepspeed_or_lora_is_refused(tiny, tmp_path):
    both = SimpleNamespace(fsdp=True, fsdp_config={"version": 2}, deepspeed="zero3.json")
    with pytest.raises(ValueError, match="--fsdp and --deepspeed cannot be combined"):
        launch.launch_mode(both)
    opts, _ = parse(flags(tiny, tmp_path, mode="lora"))
    with pytest.raises(TrainError, match="--mode lora with --fsdp is not supported"):
        mdgd_config(opts, None, "fsdp")


def test_launch_mode_maps_and_clears_the_fsdp_arguments(tmp_path, monkeypatch):
    """``--fsdp shard_grad_op`` (FSDP2: keep the gathered weights until the backward) maps
    to ``reshard_after_forward=False``; a wrapping key the own path ignores warns; the
    TrainingArguments' FSDP fields are cleared so that accelerate builds no FSDP plugin."""
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        fsdp="shard_grad_op",
        fsdp_config={"fsdp_version": 2, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"},
    )
    assert args.fsdp_plugin_args is not None  # what accelerate's plugin would be built from
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # as under torchrun
    with pytest.warns(UserWarning, match="--fsdp_config transformer_layer_cls_to_wrap ignored"):
        assert launch.launch_mode(args) == "fsdp"
    assert args.fsdp is None and args.fsdp_config is None and args.fsdp_plugin_args is None
    assert getattr(args, launch.SHARD_OPTIONS) == {"reshard_after_forward": False}
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert launch.launch_mode(plain) == "auto"
    assert not hasattr(plain, launch.SHARD_OPTIONS)
