"""The forgetting monitor (mdgd.monitor): on a plain ``transformers.Trainer``, in ``mdgd train``."""

from __future__ import annotations

import json

import pytest
import torch
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

from mdgd.data import LlavaDataset  # noqa: E402
from mdgd.metrics import effective_rank  # noqa: E402
from mdgd.monitor import HISTORY_NAME, ForgettingMonitor, exact_match, visual_erank  # noqa: E402
from mdgd.train import prepare, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


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
