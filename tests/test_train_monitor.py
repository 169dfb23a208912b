"""The forgetting monitor (mdgd.monitor): on a plain ``transformers.Trainer``, in ``mdgd train``,
across a resume, and on 2 gloo ranks (whole models, FSDP2, DeepSpeed ZeRO-3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from launch import launch_ranks
from llava_tiny import (
    IMAGE_TOKEN_ID,
    Examples,
    one_thread,  # noqa: F401  (fixture)
    tiny_llava,
    trainer_args,
)

transformers = pytest.importorskip("transformers")
from tiny_checkpoints import build_all, flags, parse  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

import mdgd.monitor  # noqa: E402
from mdgd.data import LlavaDataset  # noqa: E402
from mdgd.metrics import effective_rank  # noqa: E402
from mdgd.monitor import (  # noqa: E402
    HISTORY_NAME,
    PLOT_NAME,
    ForgettingMonitor,
    exact_match,
    visual_erank,
)
from mdgd.train import main, prepare, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
HELPERS = os.path.join(TESTS, "helpers")
DATA = os.path.join(TESTS, "data")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_all(tmp_path_factory)


def test_visual_erank_is_eq4_of_the_stacked_image_token_states():
    model = tiny_llava(seed=0)
    data = Examples(model.config, 4)
    batches = [
        {k: torch.stack([data[i][k] for i in (0, 1)]) for k in data[0]},
        {k: torch.stack([data[i][k] for i in (2, 3)]) for k in data[0]},
    ]
    rows = []
    with torch.no_grad():
        for b in batches:
            out = model(**{k: v for k, v in b.items() if k != "labels"}, output_hidden_states=True)
            rows.append(out.hidden_states[-1][b["input_ids"] == IMAGE_TOKEN_ID])
    want = float(effective_rank(torch.cat(rows)))
    assert visual_erank(model, batches) == pytest.approx(want, rel=1e-6)
    assert model.training  # restored


def test_monitor_on_a_plain_trainer(tmp_path):
    model = tiny_llava(seed=0)
    data = Examples(model.config, 8)
    probe = [{k: torch.stack([data[i][k] for i in range(4)]) for k in data[0]}]
    before = visual_erank(model, probe)
    trainer = transformers.Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=4, learning_rate=1e-2, gradient_accumulation_steps=1),
        train_dataset=data,
    )
    monitor = ForgettingMonitor(trainer, probe, every=2)
    trainer.add_callback(monitor)
    seen = []  # what a reporting callback (TensorBoard, W&B, ...) receives

    class Reporter(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.extend(k for k in logs if k.startswith("mdgd/"))

    trainer.add_callback(Reporter())
    trainer.train()
    assert seen.count("mdgd/erank") == 3 and seen.count("mdgd/erank_ref") == 3
    logged = [h for h in trainer.state.log_history if "mdgd/erank" in h]
    assert [h["step"] for h in logged] == [1, 2, 4]
    assert all(h["mdgd/erank_ref"] == pytest.approx(before) for h in logged)  # measured at step 0
    assert logged[-1]["mdgd/erank"] == pytest.approx(visual_erank(model, probe))
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2, 3, 4]
    saved = json.loads((tmp_path / HISTORY_NAME).read_text())
    assert saved["erank_ref"] == pytest.approx(before) and len(saved["history"]) == 3


def test_exact_match_scores_greedy_generations(tiny):
    from transformers import AutoModelForImageTextToText

    d = tiny["llava"]
    proc = AutoProcessor.from_pretrained(d / "model")
    model = AutoModelForImageTextToText.from_pretrained(d / "model")
    ds = LlavaDataset(d / "data.json", proc, d / "images")
    prompts = [ds.prompt(i) for i in range(3)]
    said = []
    for inputs, _ in prompts:
        out = model.generate(**inputs, do_sample=False, max_new_tokens=2, pad_token_id=0)
        said.append(
            proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    right = [(inputs, f" {s.upper()}. ") for (inputs, _), s in zip(prompts, said)]
    assert exact_match(model, proc.tokenizer, right, max_new_tokens=2) == 1.0
    wrong = [(inputs, s + " extra") for (inputs, _), s in zip(prompts, said)]
    assert exact_match(model, proc.tokenizer, wrong[:1] + right[1:], max_new_tokens=2) == 2 / 3


def test_mdgd_train_logs_eval_accuracy(tiny, tmp_path):
    d = tiny["llava"]
    rows = json.loads((d / "data.json").read_text())
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps(rows[:6]))
    opts, args = parse(flags(d, tmp_path, mode="ft", max_steps=4, **{"eval-data": eval_file}))
    r = prepare(opts, args)
    run(opts, args, r)
    acc = [h["eval/accuracy"] for h in r.trainer.state.log_history if "eval/accuracy" in h]
    assert len(acc) == 2 and all(a in {k / 6 for k in range(7)} for a in acc)  # steps 1 and 4


def test_text_only_data_trains_with_the_monitor_off(tiny, tmp_path):
    d = tiny["llava"]
    rows = [r for r in json.loads((d / "data.json").read_text()) if "image" not in r]
    data = tmp_path / "text.json"
    data.write_text(json.dumps(rows))
    opts, args = parse(flags(d, tmp_path, max_steps=2, data=data))
    with pytest.warns(UserWarning, match="no training sample has an image"):
        r = prepare(opts, args)
    assert r.monitor is None
    run(opts, args, r)
    steps = [h for h in r.trainer.state.log_history if "loss" in h]
    assert [h["mdgd/text_only_fraction"] for h in steps] == [1.0, 1.0]


@pytest.mark.parametrize("mode", ["mdgd", "ft"])
def test_resume_keeps_the_erank_history(tiny, tmp_path, monkeypatch, mode):
    """8 steps with checkpoints at 4 and 8, then a run resumed from checkpoint-4 into the
    same output dir: erank.json covers every measured step once, the first run's values
    up to step 4 unchanged (from the checkpoint's log), and phi's erank is the logged one,
    not measured again (ft: phi is the model itself, trained by the resumed step)."""
    d = tiny["llava"]
    argv = flags(d, tmp_path, mode=mode, max_steps=8, save_strategy="steps", save_steps=4)
    argv += ["--monitor-steps", "2"]
    assert main(argv) == 0
    first = json.loads((tmp_path / HISTORY_NAME).read_text())
    assert [h["step"] for h in first["history"]] == [1, 2, 4, 6, 8]
    shutil.rmtree(tmp_path / "checkpoint-8")  # as if the first run had stopped there
    (tmp_path / PLOT_NAME).unlink()
    measured = []
    erank = mdgd.monitor.visual_erank
    monkeypatch.setattr(
        mdgd.monitor, "visual_erank", lambda *a, **k: measured.append(1) or erank(*a, **k)
    )
    assert main(argv + ["--resume_from_checkpoint", str(tmp_path / "checkpoint-4")]) == 0
    assert len(measured) == 2  # theta at steps 6 and 8; phi's erank came from the log
    resumed = json.loads((tmp_path / HISTORY_NAME).read_text())
    assert [h["step"] for h in resumed["history"]] == [1, 2, 4, 6, 8]
    assert resumed["erank_ref"] == first["erank_ref"] is not None
    assert resumed["history"][:3] == first["history"][:3]
    for got, want in zip(resumed["history"][3:], first["history"][3:]):  # a resumed run
        assert got == pytest.approx(want, rel=1e-6)  # continues as the uninterrupted one
    assert (tmp_path / PLOT_NAME).is_file()


def _monitor_ranks(dmode: str, out) -> list[dict]:
    """The 2 ranks of monitor_worker.py in ``dmode``: what each rank's monitor did."""
    worker = os.path.join(HELPERS, "monitor_worker.py")
    launch_ranks([worker, dmode, str(out)], timeout=240, what=f"monitor_worker {dmode}")
    return [torch.load(out / f"{dmode}-{rank}.pt") for rank in (0, 1)]


EVERYTHING = {"visual_erank": 4, "exact_match": 3}  # phi once, theta at steps 1, 2 and 3


def test_whole_models_are_measured_on_rank_zero_only(tmp_path):
    """2 gloo ranks in "dp" mode (each holds the whole model): rank 0 alone measures
    (probe forwards and generations) and logs; rank 1's log has no entry of the monitor."""
    r0, r1 = _monitor_ranks("dp", tmp_path)
    assert [r0["calls"], r1["calls"]] == [EVERYTHING, {"visual_erank": 0, "exact_match": 0}]
    assert not r0["sharded"] and not r1["sharded"]
    assert [h["step"] for h in r0["logged"]] == [1, 2, 3] and r1["logged"] == []
    assert r1["history"] == [] and r1["erank_ref"] is None
    saved = json.loads((tmp_path / "dp" / HISTORY_NAME).read_text())  # by rank 0
    assert [h["step"] for h in saved["history"]] == [1, 2, 3]


@pytest.mark.slow
def test_sharded_models_are_measured_on_every_rank_in_lockstep(tmp_path):
    """2 gloo ranks, both models sharded by FSDP2: both ranks run the same forwards and
    generations (a rank that skipped them would hang the other in a collective), rank 0
    alone logs, and the figures and generated tokens are those of the whole model."""
    r0, r1 = _monitor_ranks("fsdp", tmp_path)
    assert [r0["calls"], r1["calls"]] == [EVERYTHING, EVERYTHING]
    assert r0["sharded"] and r1["sharded"]
    assert r1["history"] == r0["history"] and r1["said"] == r0["said"]
    assert [h["step"] for h in r0["logged"]] == [1, 2, 3] and r1["logged"] == []
    whole, _ = _monitor_ranks("dp", tmp_path)
    assert r0["said"] == whole["said"] and len(r0["said"]) == 3 * 2
    assert r0["erank_ref"] == pytest.approx(whole["erank_ref"], rel=1e-5)
    for got, want in zip(r0["history"], whole["history"], strict=True):
        assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.slow
def test_zero3_measures_theta_on_every_rank_and_phi_on_rank_zero(tiny, tmp_path):
    """``mdgd train --deepspeed <ZeRO-3>`` on 2 gloo ranks: theta is partitioned, so both
    ranks run its forwards and generations (``synced_gpus``); phi is still whole when
    training starts (mdgd train loads it whole), so rank 0 alone measures it."""
    pytest.importorskip("deepspeed")
    d = tiny["llava"]
    rows = json.loads((d / "data.json").read_text())
    data = tmp_path / "images_only.json"  # under ZeRO-3 the ranks' batches agree on images
    data.write_text(json.dumps([r for r in rows if "image" in r]))
    eval_file = tmp_path / "eval.json"
    eval_file.write_text(json.dumps(rows[:6]))
    counts = tmp_path / "counts"
    counts.mkdir()
    common = {"max_steps": 3, "monitor-steps": 2, "eval-data": eval_file}
    argv = flags(d, tmp_path / "out", data=data, ddp_backend="gloo", ddp_timeout=120, **common)
    argv += ["--eval-max-new-tokens", "3", "--deepspeed", os.path.join(DATA, "llava_zero3.json")]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        MDGD_COUNTS=str(counts),
        PYTHONPATH=os.pathsep.join([ROOT, HELPERS]),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "mdgd_counted", "train", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = [json.loads((counts / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    # theta at steps 1, 2 and 3 on both ranks; phi once, on rank 0
    assert calls == [{"visual_erank": 4, "exact_match": 3}, {"visual_erank": 3, "exact_match": 3}]
    history = json.loads((tmp_path / "out" / HISTORY_NAME).read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3] and all("mdgd/erank_ref" in h for h in history)
