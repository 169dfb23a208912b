"""``mdgd demo``: the tasks, the cache key, the report's structure, and that its numbers
come from the run (end to end on ``--quick``: one seed, ``--seeds 2``, ``--target caption``,
``--tradeoff``)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mdgd.cli import demo_main
from mdgd.demo.caption import (
    CAPTION_WORDS,
    COUNTS,
    caption_scores,
    make_caption_split,
    token_f1,
)
from mdgd.demo.evaluate import greedy
from mdgd.demo.finetune import METHODS, peft_available
from mdgd.demo.model import (
    COLOURS,
    EOS_ID,
    IMAGE_ID,
    POSITIONS,
    SHAPES,
    VOCAB,
    ModelSize,
    build_model,
)
from mdgd.demo.pretrain import PretrainSettings, cache_key
from mdgd.demo.report import TARGET_MARGIN, Row, aggregate, claims, columns
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


def _rows(ft_pre, md_pre, ft_tgt, md_tgt):
    er = {"a": 5.0, "b": 5.0, "t": 5.0}
    acc = lambda p, t: {"a": p, "b": p, "t": t}  # noqa: E731
    return [
        Row("Zero-shot", None, acc(0.9, 0.5), er, None),
        Row("Fine-tune", 10, acc(ft_pre, ft_tgt), er, 1.0),
        Row("MDGD", 10, acc(md_pre, md_tgt), er, 2.0),
    ]


def test_claims_hold_only_when_they_hold_in_every_seed():
    good = _rows(0.6, 0.85, 0.90, 0.88)
    lines = claims([good, _rows(0.7, 0.8, 0.8, 0.8)], [0, 1], ["a", "b"], "t")
    assert len(lines) == 2 and all(line.startswith("HOLDS in 2 seeds") for line in lines)
    # seed 1: MDGD forgets more; seed 2: MDGD's target is just past the margin below
    late = _rows(0.6, 0.85, 0.90, 0.90 - (TARGET_MARGIN + 0.1) / 100)
    lines = claims([good, _rows(0.8, 0.5, 0.9, 0.9), late], [4, 5, 6], ["a", "b"], "t")
    assert lines[0].startswith("DOES NOT HOLD in 3 seeds: 2 of 3, fails in seed 5")
    assert lines[1].startswith("DOES NOT HOLD in 3 seeds: 2 of 3, fails in seed 6")
    assert f"within {TARGET_MARGIN:g} points" in lines[1]
    one = claims([_rows(0.8, 0.5, 0.9, 0.9)], [0], ["a", "b"], "t")
    assert one[0].startswith("DOES NOT HOLD in this run") and one[1].startswith("HOLDS")


def test_aggregate_is_mean_and_sample_std_per_cell():
    runs = [_rows(0.5, 0.8, 0.7, 0.6), _rows(0.7, 0.9, 0.9, 0.6)]
    agg = aggregate(runs, ["a", "b"], "t")
    assert agg["Fine-tune"]["a"]["mean"] == pytest.approx(60.0)
    assert agg["Fine-tune"]["a"]["std"] == pytest.approx(np.std([50.0, 70.0], ddof=1))
    assert agg["MDGD"]["t (target)"] == {
        "mean": pytest.approx(60.0),
        "std": 0.0,
        "values": [pytest.approx(60.0), pytest.approx(60.0)],
    }
    assert agg["Zero-shot"]["ms/step"] is None and agg["MDGD"]["ms/step"]["mean"] == 2.0
    hs = [100 * h_score([p, p], t) for p, t in ((0.5, 0.7), (0.7, 0.9))]
    assert agg["Fine-tune"]["H-score"]["mean"] == pytest.approx(np.mean(hs))


# ------------------------------------------------------------------ the caption target


def test_caption_split_is_well_formed_and_seeded():
    s = make_caption_split(50, seed=3, part="train", image_size=32, num_image_tokens=16)
    t = CAPTION_WORDS + 1
    assert s.input_ids.shape == (50, 1 + 16 + 3 + t) and s.answer.shape == (50, t)
    assert (s.input_ids == IMAGE_ID).sum(1).eq(16).all()
    assert (s.labels[:, :-t] == -100).all() and torch.equal(s.labels[:, -t:], s.answer)
    assert (s.answer[:, -1] == EOS_ID).all()
    for ids in s.answer.tolist():
        n, ca, sa, rel, cb, sb = (VOCAB[i] for i in ids[:-1])
        assert n in COUNTS and rel in POSITIONS and {sa, sb} <= set(SHAPES)
        assert ca in COLOURS and cb in COLOURS and ca != cb
    again = make_caption_split(50, seed=3, part="train", image_size=32, num_image_tokens=16)
    assert torch.equal(again.pixel_values, s.pixel_values) and torch.equal(again.answer, s.answer)
    ev = make_caption_split(50, seed=3, part="eval", image_size=32, num_image_tokens=16)
    assert not torch.equal(ev.pixel_values, s.pixel_values)


def test_token_f1_and_exact_match():
    assert token_f1([1, 2, 3], [1, 2, 4]) == pytest.approx(2 / 3)
    assert token_f1([1, 1], [1]) == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert token_f1([5], [6]) == 0.0 and token_f1([], []) == 1.0 and token_f1([], [1]) == 0.0
    e = EOS_ID
    gen = torch.tensor([[7, 8, e, 9], [7, 9, 8, e], [7, 8, 9, 9]])
    ref = torch.tensor([[7, 8, e, e], [7, 8, 9, e], [7, 8, e, e]])
    exact, f1 = caption_scores(gen, ref)
    assert exact == pytest.approx(1 / 3)  # only the first: words after <eos> do not count
    # F1: order does not matter (second row), extra words lower precision (third: 2/4, 1)
    assert f1 == pytest.approx((1.0 + 1.0 + 2 / 3) / 3)


def test_greedy_generation_is_the_argmax_of_its_own_continuation():
    model = build_model(QUICK.model, seed=0).eval()
    size = QUICK.model
    split = make_caption_split(4, 0, "eval", size.image_size, size.num_image_tokens)
    steps = CAPTION_WORDS + 1
    prompt = {**split.batch(torch.arange(4)), "input_ids": split.input_ids[:, :-steps]}
    generated, _ = greedy(model, prompt, steps)
    full = torch.cat([prompt["input_ids"], generated], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, pixel_values=prompt["pixel_values"]).logits
    assert torch.equal(logits[:, -steps - 1 : -1].argmax(-1), generated)


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
        acc = m["score"]
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
            assert f"{100 * m['score'][t]:.1f}" in line
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
    assert (ft_again["score"], ft_again["erank"]) != (ft_first["score"], ft_first["erank"])
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


# ------------------------------------------------------------------ --seeds, --target, --tradeoff


def _header(table: str) -> list[str]:
    return re.split(r"\s{2,}", table.splitlines()[0].strip())


def test_quick_two_seeds_mean_and_std_come_from_the_per_seed_reports(quick, tmp_path):
    _, args, first = quick
    methods = ["Fine-tune", "MDGD"]
    report = demo_main(
        [*args, "--out", str(tmp_path), "--seeds", "2", "--methods", ",".join(methods)]
    )
    pre, tgt = report["tasks"]["pretrained"], report["tasks"]["target"]
    head = ["Method", *columns(pre, tgt, caption=False)]
    assert _header(report["table"]) == head
    assert f"| {' | '.join(head)} |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").exists() and (tmp_path / "seed_1" / "report.png").exists()
    assert report["meta"]["seeds"] == [0, 1]

    per_seed = [json.loads(Path(p).read_text()) for p in report["per_seed"]]
    assert [r["meta"]["seed"] for r in per_seed] == [0, 1]
    assert per_seed[0]["methods"][0] == first["methods"][0]  # seed 0: the cached phase 1
    assert per_seed[1]["meta"]["pretrain"]["from_cache"] is False  # seed 1: its own
    assert list(report["aggregate"]) == ["Zero-shot", *methods]
    lines = report["table"].splitlines()[2:]
    for i, name in enumerate(["Zero-shot", *methods]):
        rows = [r["methods"][i] for r in per_seed]
        assert {r["method"] for r in rows} == {name}
        values = {t: [100 * r["score"][t] for r in rows] for t in pre}
        values[f"{tgt} (target)"] = [100 * r["target"] for r in rows]
        values["H-score"] = [100 * r["h_score"] for r in rows]
        values["erank"] = [r["erank_mean"] for r in rows]
        line = next(x for x in lines if x.startswith(name))
        for col, xs in values.items():
            cell = report["aggregate"][name][col]
            assert cell["mean"] == pytest.approx(np.mean(xs))
            assert cell["std"] == pytest.approx(np.std(xs, ddof=1))
            assert f"{np.mean(xs):.1f} ± {np.std(xs, ddof=1):.1f}" in line
    claim_lines = report["verdict"][-2:]
    assert all("2 seeds" in x and ("HOLDS" in x or "DOES NOT HOLD" in x) for x in claim_lines)


def test_quick_caption_target(quick, tmp_path):
    _, args, _ = quick
    report = demo_main([*args, "--out", str(tmp_path), "--target", "caption", "--methods", "MDGD"])
    pre = report["tasks"]["pretrained"]
    assert report["tasks"]["target"] == "caption"
    assert report["tasks"]["target_metric"] == "token F1"
    assert _header(report["table"]) == ["Method", *columns(pre, "caption", caption=True)]
    n_eval = report["tasks"]["eval_examples"]
    for m in report["methods"]:
        assert set(m["score"]) == {*pre, "caption"} and set(m["exact_match"]) == {"caption"}
        em, f1 = m["exact_match"]["caption"], m["score"]["caption"]
        assert 0.0 <= em <= f1 <= 1.0  # an exact match has F1 1
        assert math.isclose(em * n_eval, round(em * n_eval), abs_tol=1e-6)
        assert m["target"] == f1 and "odd-digit" not in m["score"]
    mdgd = report["methods"][1]
    assert mdgd["method"] == "MDGD" and math.isfinite(mdgd["loss_last"])


def test_quick_tradeoff_points_are_the_models_along_the_run(quick, tmp_path):
    _, args, _ = quick
    names = ["Fine-tune", "LoRA", "MDGD", "MDGD-GM"]
    if not peft_available():
        names.remove("LoRA")
    report = demo_main([*args, "--out", str(tmp_path), "--tradeoff", "--methods", ",".join(names)])
    assert (tmp_path / "report_tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    trade = report["tradeoff"]
    assert list(trade["methods"]) == names and trade["knob"] == "phase-2 steps"
    steps = [0, *QUICK.tradeoff_steps()]
    assert len(steps) == 5 and steps[-1] == QUICK.finetune.steps
    by = {m["method"]: m for m in report["methods"]}
    zero = by["Zero-shot"]
    for name, points in trade["methods"].items():
        assert [p["steps"] for p in points] == steps
        for p, m in ((points[0], zero), (points[-1], by[name])):  # the ends: the table's rows
            assert p["pretrained_mean"] == pytest.approx(100 * m["pretrained_mean"])
            assert p["target"] == pytest.approx(100 * m["target"])
    # a shorter run gives the same model as the sweep's point at that many steps
    k = steps[2]
    short = demo_main(
        [
            *args,
            "--out",
            str(tmp_path / "short"),
            "--methods",
            "Fine-tune",
            "--finetune-steps",
            str(k),
        ]
    )
    point = trade["methods"]["Fine-tune"][2]
    assert point["pretrained_mean"] == pytest.approx(100 * short["methods"][1]["pretrained_mean"])
    assert point["target"] == pytest.approx(100 * short["methods"][1]["target"])


def test_seeds_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        demo_main(["--seeds", "0"])
    assert "--seeds must be at least 1" in capsys.readouterr().err
