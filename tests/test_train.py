"""``mdgd train`` end to end on tiny LLaVA and LLaVA-NeXT checkpoints on disk (CPU, offline).

The checkpoints (tokenizer built with ``tokenizers``, image processor, chat
template, processor, random weights) and the 48-sample dataset (PNG images, a
third text-only, some multi-turn) are built once per session (:mod:`tiny_checkpoints`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from llava_tiny import one_thread  # noqa: F401  (fixture)
from tiny_checkpoints import build_all, flags, parse

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from tolerances import prefixed  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from mdgd.data import IGNORE, LlavaDataset, to_messages  # noqa: E402
from mdgd.monitor import HISTORY_NAME, PLOT_NAME  # noqa: E402
from mdgd.train import SUMMARY_NAME, main, prepare, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_all(tmp_path_factory)


def trainable_state(path) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


# ---------------------------------------------------------------------- labels and data


def test_labels_supervise_the_assistant_turns_only(tiny):
    """Sample s01 (image, two turns) against its hand-written token list and mask."""
    d = tiny["llava"]
    ds = LlavaDataset(d / "data.json", AutoProcessor.from_pretrained(d / "model"), d / "images")
    enc = ds[1]
    tokens = ds.processor.tokenizer.convert_ids_to_tokens(enc["input_ids"])
    prompt1 = ["USER", ":"] + ["<image>"] * 4 + "what colour is the square ? ASSISTANT :".split()
    prompt2 = "USER : and the shape ? ASSISTANT :".split()
    want = (
        [(t, False) for t in prompt1]
        + [("green", True), ("</s>", True)]
        + [(t, False) for t in prompt2]
        + [("square", True), ("</s>", True)]
    )
    assert list(zip(tokens, (enc["labels"] != IGNORE).tolist())) == want
    sup = enc["labels"] != IGNORE
    assert torch.equal(enc["labels"][sup], enc["input_ids"][sup])
    assert enc["pixel_values"].shape == (1, 3, 16, 16)
    assert len(ds) == 48 and ds.num_text_only == 16 and ds.dropped == []
    text_only = ds[2]
    assert "pixel_values" not in text_only
    assert (text_only["input_ids"] != ds.image_token_id).all()


def test_tokens_equal_the_processors_own_chat_encoding(tiny):
    """Piece by piece == ``processor.apply_chat_template(tokenize=True)`` of the whole
    conversation, with a tokenizer that adds BOS (as Llama's does)."""
    from tokenizers import processors

    d = tiny["llava"]
    proc = AutoProcessor.from_pretrained(d / "model")
    tok = proc.tokenizer
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    ds = LlavaDataset(d / "data.json", proc, d / "images")
    for i in (1, 2):  # two turns with an image; text-only
        rec = ds.record(i)
        messages = to_messages(rec["conversations"])
        for part in messages[0]["content"]:
            if part["type"] == "image":
                part["path"] = str(d / "images" / rec["image"])
        want = proc.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_tensors="pt"
        )
        got = ds[i]
        assert torch.equal(got["input_ids"], want["input_ids"][0])
        assert (got["input_ids"] == tok.bos_token_id).nonzero().flatten().tolist() == [0]
        if "pixel_values" in want:
            assert torch.equal(got["pixel_values"], want["pixel_values"])


def test_labels_of_the_second_family(tiny):
    """LLaVA-NeXT, byte-level BPE: the supervised runs decode to the answers and their </s>."""
    d = tiny["llava_next"]
    proc = AutoProcessor.from_pretrained(d / "model")
    ds = LlavaDataset(d / "data.json", proc, d / "images")
    for i, answers in ((1, ["green</s>", "square</s>"]), (2, ["three</s>"])):
        enc = ds[i]
        sup = (enc["labels"] != IGNORE).int()
        edges = torch.nonzero(torch.diff(torch.cat([torch.zeros(1), sup, torch.zeros(1)])))
        runs = edges.flatten().tolist()
        got = [
            proc.tokenizer.decode(enc["input_ids"][a:b]).strip()
            for a, b in zip(runs[::2], runs[1::2])
        ]
        assert got == answers
    # a 16x32 picture is tiled differently from a 16x16 one: more image tokens
    counts = {int((ds[i]["input_ids"] == ds.image_token_id).sum()) for i in (0, 1)}
    assert len(counts) == 2


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_start_up_token_counts_bound_or_equal_the_full_encoding(tiny, family):
    """The index is built from the images' sizes only: each sample's token bound is at least
    its full encoding's length, and where it is exact (forced by a small max_length) equal."""
    d = tiny[family]
    proc = AutoProcessor.from_pretrained(d / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back to processing every image
        loose = LlavaDataset(d / "data.json", proc, d / "images", cache=False)
        tight = LlavaDataset(d / "data.json", proc, d / "images", max_length=1000, cache=False)
    assert not loose.index.exact.any()
    tight_exact = tight.index.exact
    for i in range(len(loose)):
        n = loose[i]["input_ids"].shape[0]
        assert loose.index.tokens[i] >= n, i
        if tight_exact[i]:
            assert tight.index.tokens[i] == n, i


def test_truncation_keeps_what_fits_and_drops_cut_answers(tiny):
    d = tiny["llava"]
    proc = AutoProcessor.from_pretrained(d / "model")
    ds = LlavaDataset(d / "data.json", proc, d / "images", max_length=20)
    assert ds.dropped == []
    enc = ds[1]  # 26 tokens: the second answer is cut
    assert enc["input_ids"].shape[0] == 20
    sup = enc["labels"][enc["labels"] != IGNORE]
    assert proc.tokenizer.convert_ids_to_tokens(sup) == ["green", "</s>"]
    with pytest.warns(UserWarning, match=r"dropped 32 of 48 sample\(s\) whose answers"):
        ds = LlavaDataset(d / "data.json", proc, d / "images", max_length=13)
    assert len(ds) == 16 and ds.num_text_only == 16  # every image sample's answer was cut


# ---------------------------------------------------------------------- training runs


@pytest.mark.parametrize(
    "family, mode",
    [
        ("llava", "mdgd"),
        ("llava", "gm"),
        ("llava", "ft"),
        ("llava", "lora"),
        ("llava_next", "mdgd"),
    ],
)
def test_train_mode(tiny, tmp_path, family, mode):
    d = tiny[family]
    opts, args = parse(flags(d, tmp_path, mode=mode))
    r = prepare(opts, args)
    ref_before = None
    if r.ref_model is not None:
        ref_before = {k: v.clone() for k, v in r.ref_model.state_dict().items()}
    summary = run(opts, args, r)

    logs = r.trainer.state.log_history
    losses = [h["loss"] for h in logs if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    eranks = [h for h in logs if "mdgd/erank" in h]
    assert [h["step"] for h in eranks] == [1, 4, 8, 12]
    assert all(h["mdgd/erank"] > 1.0 and h["mdgd/erank_ref"] > 1.0 for h in eranks)
    assert (tmp_path / PLOT_NAME).exists() and (tmp_path / HISTORY_NAME).exists()
    if mode in ("mdgd", "gm"):
        steps = [h for h in logs if "loss" in h]
        assert any(h["mdgd/text_only_fraction"] == 1.0 for h in steps)  # text-only, for real
        # L_v is 0 at the first step (theta == phi) and at the text-only ones only
        assert [h["mdgd/loss_v"] > 0.0 for h in steps] == [
            k > 0 and h["mdgd/text_only_fraction"] < 1.0 for k, h in enumerate(steps)
        ]
        after = r.ref_model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in ref_before.items()), "phi changed"
    if mode == "gm":
        fractions = [h["mdgd/selected_fraction"] for h in logs if "loss" in h]
        assert all(f < 0.5 for f in fractions), fractions  # alpha 0.1 (step 1: every cos ties)

    # the final model reloads with from_pretrained (LoRA: merged) and is the trained one
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    model = r.trainer.model
    trained = model.merge_and_unload() if mode == "lora" else model
    pre = AutoModelForImageTextToText.from_pretrained(d / "model")
    changed = 0
    for (name, a), b, c in zip(
        reloaded.state_dict().items(), trained.state_dict().values(), pre.state_dict().values()
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=prefixed(name))
        changed += not torch.equal(a, c)
    assert changed > 0
    assert AutoProcessor.from_pretrained(tmp_path).chat_template
    saved = json.loads((tmp_path / SUMMARY_NAME).read_text())
    assert saved["steps"] == 12 and saved["text_only_samples"] == 16
    assert saved["final_loss"] == losses[-1] == summary["final_loss"]


def test_bfloat16_weights_with_float32_trainable_parameters(tiny, tmp_path, capsys):
    d = tiny["llava"]
    opts, args = parse(flags(d, tmp_path, max_steps=3, dtype="bfloat16", bf16="true"))
    r = prepare(opts, args)
    trainable = set(r.trainer.engine.param_names)
    for model in (r.trainer.model, r.ref_model):
        for name, p in model.named_parameters():
            assert p.dtype == (torch.float32 if name in trainable else torch.bfloat16), name
    run(opts, args, r)
    losses = [h["loss"] for h in r.trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    # the monitor's forwards run under the Trainer's autocast too
    assert [h["step"] for h in r.trainer.state.log_history if "mdgd/erank" in h] == [1, 3]
    line = _fails(capsys, flags(d, tmp_path, dtype="bfloat16"))
    assert "--dtype bfloat16 with --trainable-dtype float32 needs mixed precision" in line


def test_resume_equals_the_uninterrupted_run(tiny, tmp_path):
    d = tiny["llava"]
    common = dict(max_steps=6, **{"monitor-steps": 0})
    assert main(flags(d, tmp_path / "full", **common)) == 0
    half = flags(d, tmp_path / "half", save_strategy="steps", save_steps=3, **common)
    assert main(half) == 0
    shutil.rmtree(tmp_path / "half" / "checkpoint-6")
    assert main(half + ["--resume_from_checkpoint", str(tmp_path / "half" / "checkpoint-3")]) == 0
    full, resumed = trainable_state(tmp_path / "full"), trainable_state(tmp_path / "half")
    start = trainable_state(d / "model")
    assert any(not torch.equal(full[k], start[k]) for k in full)
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0, msg=prefixed(k))


def test_two_processes_equal_one_process_on_the_union(tiny, tmp_path):
    """torchrun, 2 gloo ranks in dp mode, batch 2 each == 1 process, 2 micro-batches of 2."""
    d = tiny["llava"]
    common = dict(max_steps=4, **{"monitor-steps": 2})
    argv = flags(d, tmp_path / "two", ddp_backend="gloo", ddp_timeout=120, **common)
    # torchrun --standalone picks a free port itself
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "mdgd", "train", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    opts, args = parse(flags(d, tmp_path / "one", gradient_accumulation_steps=2, **common))
    r = prepare(opts, args)
    run(opts, args, r)
    steps = [h for h in r.trainer.state.log_history if "loss" in h]
    assert any(h["mdgd/text_only_fraction"] > 0.0 for h in steps)  # text-only micro-batches too
    two, one = trainable_state(tmp_path / "two"), trainable_state(tmp_path / "one")
    start = trainable_state(d / "model")
    assert any(not torch.equal(one[k], start[k]) for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=prefixed(k))
    s_two = json.loads((tmp_path / "two" / SUMMARY_NAME).read_text())
    s_one = json.loads((tmp_path / "one" / SUMMARY_NAME).read_text())
    assert s_two["figures"]["mdgd/erank"] == pytest.approx(s_one["figures"]["mdgd/erank"], 1e-4)


# ---------------------------------------------------------------------- bad input


def _fails(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("mdgd train: error: ")
    return err[-1]


def _data_copy(d, tmp_path, edit) -> str:
    rows = json.loads((d / "data.json").read_text())
    edit(rows)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_missing_image_names_the_sample_and_path(tiny, tmp_path, capsys):
    d = tiny["llava"]

    def rename(rows):
        rows[4]["image"] = "nowhere.png"

    line = _fails(capsys, flags(d, tmp_path, data=_data_copy(d, tmp_path, rename)))
    assert "sample 4 (id 's04'): image not found: " in line
    assert line.endswith(str(d / "images" / "nowhere.png"))


def test_malformed_json_names_the_line(tiny, tmp_path, capsys):
    d = tiny["llava"]
    bad = tmp_path / "bad.json"
    turns = '[{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]'
    ok = f'{{"id": "a", "conversations": {turns}}}'
    bad.write_text(f'[\n {ok},\n {{"id": "b",, }}\n]')
    line = _fails(capsys, flags(d, tmp_path, data=bad))
    assert f"{bad}: not valid JSON at line 3, column 13" in line
    rows = (d / "data.json").read_text()
    lines = [json.dumps(r) for r in json.loads(rows)[:3]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], lines[1], lines[2][:-5]]) + "\n")
    assert f"{bad}: line 3: not valid JSON" in _fails(capsys, flags(d, tmp_path, data=bad))


def test_malformed_entry_names_the_sample(tiny, tmp_path, capsys):
    d = tiny["llava"]

    def drop_turns(rows):
        rows[7]["conversations"] = [{"from": "robot", "value": "hi"}]

    line = _fails(capsys, flags(d, tmp_path, data=_data_copy(d, tmp_path, drop_turns)))
    assert "sample 7 (id 's07'): turn 0 must be" in line


def test_image_count_mismatch(tiny, tmp_path, capsys):
    d = tiny["llava"]

    def no_placeholder(rows):
        rows[3]["conversations"][0]["value"] = "what colour is it ?"

    line = _fails(capsys, flags(d, tmp_path, data=_data_copy(d, tmp_path, no_placeholder)))
    assert (
        "sample 3 (id 's03'): 0 <image> placeholder(s) in the conversation but 1 image(s)" in line
    )


def test_unsupported_model(tiny, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    ).save_pretrained(tmp_path / "llama")
    line = _fails(capsys, flags(tiny["llava"], tmp_path, model=tmp_path / "llama"))
    assert "LlamaForCausalLM (model_type 'llama') is not a supported vision-language model" in line


def test_bad_data_fails_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    """Each start-up data error is one line, and no weight was read before it."""
    import mdgd.train

    def no_weights(*a, **k):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(mdgd.train, "load_model", no_weights)
    d = tiny["llava"]

    def assistant_first(rows):
        rows[9]["conversations"] = rows[9]["conversations"][1:]

    line = _fails(capsys, flags(d, tmp_path, data=_data_copy(d, tmp_path, assistant_first)))
    assert "sample 9 (id 's09'): the conversation starts with an assistant ('gpt') turn" in line
    latin1 = tmp_path / "latin1.json"
    text = (d / "data.json").read_text().replace('"say ', '"sày ', 1)
    latin1.write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe0")
    line = _fails(capsys, flags(d, tmp_path, data=latin1))
    assert f"{latin1}: not UTF-8: byte 0xe0 at byte offset {offset} " in line


def test_missing_local_model_directory(tiny, tmp_path, capsys):
    for path in (tmp_path / "no-such-model", "./runs/typo/model"):
        line = _fails(capsys, flags(tiny["llava"], tmp_path, model=path))
        assert line == f"mdgd train: error: --model {path}: no such directory"


def test_cli_help_lists_the_flags(capsys):
    from mdgd.cli import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--data",
        "--image_folder",
        "--mode",
        "--alpha",
        "--no_align",
        "--train_layers",
        "--no_projector",
        "--trainable",
        "--max_length",
        "--monitor_steps",
        "--eval_data",
        "--learning_rate",
    ):
        assert flag in out, flag
