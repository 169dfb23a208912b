"""``mdgd demo``: the tasks, the cache key, the report's structure, and that its numbers
come from the run (end to end on ``--quick``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mdgd.cli import demo_main
from mdgd.demo.finetune import METHODS, peft_available
from mdgd.demo.model import IMAGE_ID, VOCAB, ModelSize
from mdgd.demo.pretrain import PretrainSettings, cache_key
from mdgd.demo.report import Row, verdict
from mdgd.demo.run import QUICK
from mdgd.demo.tasks import ALL_TASKS, PRETRAINED_TASKS, TARGET_TASK, digit_pool, make_split
from mdgd.metrics import h_score

# ------------------------------------------------------------------ tasks and cache key


@pytest.mark.parametrize("name", list(ALL_TASKS), ids=list(ALL_TASKS))
def test_split_is_well_formed_and_seeded(name):
    task = ALL_TASKS[name]
    s = make_split(task, 40, seed=3, part="train", image_size=32, num_image_tokens=16)
    assert s.pixel_values.shape == (40, 3, 32, 32) and s.pixel_values.dtype == torch.float32
    assert s.pixel_values.min() >= -1 and s.pixel_values.max() <= 1
    assert s.input_ids.shape == (40, 1 + 16 + 3 + 1)
    assert (s.input_ids == IMAGE_ID).sum(1).eq(16).all()
    # the only label is the answer, one of the task's own answer words
    assert (s.labels[:, :-1] == -100).all()
    assert torch.equal(s.labels[:, -1], torch.tensor(task.answer_ids)[s.answer])
    assert {VOCAB[i] for i in s.labels[:, -1].tolist()} <= set(task.answers)
    again = make_split(task, 40, seed=3, part="train", image_size=32, num_image_tokens=16)
    assert torch.equal(again.pixel_values, s.pixel_values)
    other = make_split(task, 40, seed=4, part="train", image_size=32, num_image_tokens=16)
    assert not torch.equal(other.pixel_values, s.pixel_values)
    ev = make_split(task, 40, seed=3, part="eval", image_size=32, num_image_tokens=16)
    assert not torch.equal(ev.pixel_values, s.pixel_values)


def test_digit_scans_for_training_and_evaluation_are_disjoint():
    tr, _ = digit_pool("train")
    ev, _ = digit_pool("eval")
    assert len(tr) + len(ev) == 1797
    tr_keys = {x.tobytes() for x in tr}
    overlap = sum(x.tobytes() in tr_keys for x in ev)
    assert overlap <= 2  # load_digits holds a couple of exact duplicate scans


def test_target_task_is_not_a_pretrained_task():
    assert TARGET_TASK.name not in {t.name for t in PRETRAINED_TASKS}
    assert TARGET_TASK.question not in {t.question for t in PRETRAINED_TASKS}


def test_cache_key_changes_with_everything_that_changes_the_model():
    size, st = ModelSize(), PretrainSettings()
    base = cache_key(size, st, 0)
    assert cache_key(size, st, 0) == base
    assert cache_key(size, st, 1) != base
    assert cache_key(size, PretrainSettings(steps=st.steps + 1), 0) != base
    assert cache_key(size, PretrainSettings(lr=st.lr * 2), 0) != base
    assert cache_key(ModelSize(text_layers=3), st, 0) != base


def test_verdict_says_so_when_mdgd_does_not_beat_fine_tuning():
    tasks = ["a", "b"]
    acc = lambda a, b, t: {"a": a, "b": b, "t": t}  # noqa: E731
    er = {"a": 5.0, "b": 5.0, "t": 5.0}
    rows = [
        Row("Zero-shot", None, acc(0.9, 0.9, 0.5), er, None),
        Row("Fine-tune", 10, acc(0.8, 0.8, 0.9), er, 1.0),
        Row("MDGD", 10, acc(0.5, 0.5, 0.9), er, 2.0),
    ]
    text = " ".join(verdict(rows, tasks, "t"))
    assert "did NOT forget less" in text
    rows[2] = Row("MDGD", 10, acc(0.88, 0.9, 0.9), er, 2.0)
    assert "MDGD forgot less" in " ".join(verdict(rows, tasks, "t"))


# ------------------------------------------------------------------ end to end (--quick)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    args = ["--quick", "--no-progress", "--cache-dir", str(root / "cache")]
    report = demo_main([*args, "--out", str(root / "out")])
    return root, args, report


def _expected_methods() -> list[str]:
    names = [m.name for m in METHODS if m.mode != "lora" or peft_available()]
    return ["Zero-shot", *names]


def test_quick_report_files_and_structure(quick):
    root, _, report = quick
    out = root / "out"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| Method |" in md and "H-score" in md

    assert [m["method"] for m in report["methods"]] == _expected_methods()
    assert report["tasks"]["pretrained"] == [t.name for t in PRETRAINED_TASKS]
    assert report["tasks"]["target"] == TARGET_TASK.name
    assert report["meta"]["size"] == "quick" and report["meta"]["wall_seconds"] > 0
    assert report["meta"]["pretrain"]["from_cache"] is False
    assert report["verdict"] and all(isinstance(line, str) for line in report["verdict"])


def test_quick_numbers_are_consistent(quick):
    _, _, report = quick
    pre, tgt = report["tasks"]["pretrained"], report["tasks"]["target"]
    n_eval = report["tasks"]["eval_examples"]
    hidden = QUICK.model.text_hidden
    for m in report["methods"]:
        acc = m["accuracy"]
        assert set(acc) == {*pre, tgt}
        for v in acc.values():
            assert 0.0 <= v <= 1.0
            assert math.isclose(
                v * n_eval, round(v * n_eval), abs_tol=1e-6
            )  # counted on the eval set
        pm = np.mean([acc[t] for t in pre])
        assert m["pretrained_mean"] == pytest.approx(pm)
        assert m["avg"] == pytest.approx(np.mean([*(acc[t] for t in pre), acc[tgt]]))
        assert m["h_score"] == pytest.approx(h_score([acc[t] for t in pre], acc[tgt]))
        for v in m["erank"].values():
            assert 1.0 <= v <= hidden
        if m["method"] == "Zero-shot":
            assert m["params"] is None and m["step_ms"] is None
        else:
            assert m["step_ms"] > 0 and m["train_seconds"] > 0 and m["params"] > 0
            assert math.isfinite(m["loss_first"]) and math.isfinite(m["loss_last"])
    by = {m["method"]: m for m in report["methods"]}
    assert by["MDGD-GM"]["params"] < by["MDGD"]["params"] == by["Fine-tune"]["params"]
    assert by["MDGD"]["engine_figures_mean"]["loss_v"] >= 0
    if "LoRA" in by:
        assert by["LoRA"]["params"] < by["Fine-tune"]["params"]


def test_quick_table_prints_the_measured_numbers(quick, capsys):
    _, _, report = quick
    table = report["table"]
    for m in report["methods"]:
        line = next(x for x in table.splitlines() if x.startswith(m["method"]))
        for t in report["tasks"]["pretrained"]:
            assert f"{100 * m['accuracy'][t]:.1f}" in line
        assert f"{100 * m['h_score']:.1f}" in line


def test_second_run_reuses_the_cache_and_numbers_follow_the_run(quick, tmp_path):
    root, args, first = quick
    # same seed, cache hit: the pre-trained model, hence the zero-shot row, is identical;
    # fewer fine-tuning steps give a different fine-tuned row
    again = demo_main(
        [*args, "--out", str(tmp_path / "a"), "--methods", "Fine-tune", "--finetune-steps", "3"]
    )
    assert again["meta"]["pretrain"]["from_cache"] is True
    assert again["methods"][0] == first["methods"][0]
    ft_first = next(m for m in first["methods"] if m["method"] == "Fine-tune")
    ft_again = again["methods"][1]
    assert ft_again["method"] == "Fine-tune"
    assert (ft_again["accuracy"], ft_again["erank"]) != (ft_first["accuracy"], ft_first["erank"])
    # another seed: other data, another pre-trained model, other numbers
    other = demo_main(
        [
            *args,
            "--out",
            str(tmp_path / "b"),
            "--seed",
            "1",
            "--pretrain-steps",
            "10",
            "--methods",
            "Fine-tune",
            "--finetune-steps",
            "2",
        ]
    )
    assert other["meta"]["pretrain"]["from_cache"] is False
    assert other["methods"][0]["erank"] != first["methods"][0]["erank"]
