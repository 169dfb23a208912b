"""``mdgd.data``: the streaming scan, the cached index, lazy samples and bad data.

The tiny LLaVA checkpoints and the 48-sample dataset are the ones ``mdgd train``'s
tests use (:mod:`tiny_checkpoints`).
"""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from tiny_checkpoints import build_all

transformers = pytest.importorskip("transformers")
from transformers import AutoProcessor  # noqa: E402

from mdgd.data import SKIPPED, Collator, DataError, LlavaDataset, load_records  # noqa: E402
from mdgd.data import index as index_mod  # noqa: E402
from mdgd.data import scan as scan_mod  # noqa: E402
from mdgd.data.scan import data_files, read_sample, scan  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_all(tmp_path_factory)


def _rows(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    text = ["plain", "héllo wörld", "✓ tick", "emoji 🙂", 'quote " and \\ slash', "\n"]
    return [
        {
            "id": f"r{i}",
            "conversations": [
                {"from": "human", "value": " ".join(rng.choices(text, k=rng.randint(0, 9)))},
                {"from": "gpt", "value": " ".join(rng.choices(text, k=rng.randint(1, 9)))},
            ],
        }
        for i in range(n)
    ]


# ---------------------------------------------------------------------- the scan


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
@pytest.mark.parametrize("layout", ["list", "indented", "jsonl", "bom"])
def test_scan_yields_every_sample_and_where_it_lies(tmp_path, monkeypatch, block, layout):
    """Blocks as small as one byte split multi-byte characters and samples anywhere."""
    monkeypatch.setattr(scan_mod, "BLOCK", block)
    rows = _rows(block, 40)
    path = tmp_path / ("d.jsonl" if layout == "jsonl" else "d.json")
    if layout == "jsonl":
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    else:
        text = json.dumps(rows, ensure_ascii=False, indent=2 if layout == "indented" else None)
    path.write_bytes((b"\xef\xbb\xbf" if layout == "bom" else b"") + text.encode("utf-8"))
    found = list(scan(path))
    assert [r for _, _, r in found] == rows
    with open(path, "rb") as f:
        assert [read_sample(f, offset, size) for offset, size, _ in found] == rows


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '[{"a": 1},\n {"b": 2}} ]',
            "not valid JSON at line 2, column 10 (Expecting ',' delimiter)",
        ),
        (
            '[{"a": 1}, {"b": 2}] x',
            "not valid JSON at line 1, column 22 (Extra data after the list)",
        ),
        ('[{"a": 1}, {"b": 2', "not valid JSON at line 1, column 19"),
        ('{"a": 1}\n{"b": \n', "line 2: not valid JSON"),
        ("", "expected a JSON list of samples"),
    ],
)
def test_bad_json_names_the_place(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError, match=f"^{path}: ") as e:
        list(scan(path))
    assert message in str(e.value)


@pytest.mark.parametrize("layout", ["list", "jsonl"])
def test_not_utf8_names_the_byte_offset(tmp_path, layout):
    head = '[{"id": "é", "conversations": "' if layout == "list" else '{"id": "é"}\n{"id": "'
    data = head.encode("utf-8") + b"caf\xe9"  # latin-1 é
    path = tmp_path / "d.json"
    path.write_bytes(data + (b'"}]' if layout == "list" else b'"}\n'))
    with pytest.raises(DataError) as e:
        list(scan(path))
    offset = len(head.encode("utf-8")) + 3
    assert str(e.value).startswith(f"{path}: not UTF-8: byte 0xe9 at byte offset {offset} ")


def test_yaml_lists_files_with_llava_next_sampling(tmp_path):
    rows = _rows(0, 20)
    (tmp_path / "a.json").write_text(json.dumps(rows[:10]))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[10:]))
    spec = tmp_path / "mix.yaml"
    spec.write_text(
        "datasets:\n  - json_path: a.json\n    sampling_strategy: first:30%\n"
        "  - json_path: sub/b.jsonl\n    sampling_strategy: end:2\n"
        "  - json_path: a.json\n    sampling_strategy: random:4\n"
    )
    files = data_files(spec)
    assert [(f.path.name, f.sampling) for f in files] == [
        ("a.json", "first:30%"),
        ("b.jsonl", "end:2"),
        ("a.json", "random:4"),
    ]
    got = [r["id"] for r in load_records(spec)]
    assert got[:5] == ["r0", "r1", "r2", "r18", "r19"]
    assert len(got) == 9 and set(got[5:]) <= {f"r{i}" for i in range(10)}
    spec.write_text("datasets:\n  - json_path: a.json\n    sampling_strategy: half\n")
    with pytest.raises(DataError, match=r"datasets\[0\]: sampling_strategy must be"):
        data_files(spec)
    spec.write_text("- a.json\n")
    with pytest.raises(DataError, match="expected LLaVA-NeXT's layout"):
        data_files(spec)


# ---------------------------------------------------------------------- the index


def _copy(d, tmp_path, edit=None, name="data.json"):
    rows = json.loads((d / "data.json").read_text())
    if edit is not None:
        edit(rows)
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def test_index_is_cached_and_rebuilt_when_the_file_changes(tiny, tmp_path, monkeypatch):
    d = tiny["llava"]
    proc = AutoProcessor.from_pretrained(d / "model")
    path = _copy(d, tmp_path)
    cache = tmp_path / "cache"
    first = LlavaDataset(path, proc, d / "images", cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1

    def no_build(*a, **k):
        raise AssertionError("the index was built again")

    monkeypatch.setattr(index_mod, "build_index", no_build)
    again = LlavaDataset(path, proc, d / "images", cache_dir=cache)
    for key in index_mod.Index.ARRAYS:
        assert (getattr(first.index, key) == getattr(again.index, key)).all(), key
    assert [again.record(i) for i in range(3)] == [first.record(i) for i in range(3)]
    _copy(d, tmp_path, lambda rows: rows.pop(0))  # another size and mtime: another key
    with pytest.raises(AssertionError, match="built again"):
        LlavaDataset(path, proc, d / "images", cache_dir=cache)
    with pytest.raises(AssertionError, match="built again"):  # another max_length
        LlavaDataset(path, proc, d / "images", max_length=100, cache_dir=cache)


def test_modality_lengths_are_llava_word_counts(tiny):
    d = tiny["llava"]
    ds = LlavaDataset(d / "data.json", AutoProcessor.from_pretrained(d / "model"), d / "images")
    for i in range(len(ds)):
        rec = ds.record(i)
        words = sum(len(t["value"].split()) for t in rec["conversations"])
        assert ds.modality_lengths[i] == (words if "image" in rec else -words)
    assert ds.num_text_only == 16


def test_token_bound_holds_for_any_text(tiny, tmp_path):
    """Random non-ASCII, long and short texts through the byte-level BPE of LLaVA-NeXT and
    the word-level tokenizer of LLaVA: the bound is at least the full encoding's length."""
    for family in ("llava", "llava_next"):
        d = tiny[family]
        proc = AutoProcessor.from_pretrained(d / "model")
        rows = _rows(1, 30)
        for k, row in enumerate(rows[:15]):
            row["image"] = f"s{3 * k:02d}.png"
            row["conversations"] = [dict(t) for t in row["conversations"] * (1 + k % 3)]
            row["conversations"][0]["value"] = "<image>\n" + row["conversations"][0]["value"]
        path = tmp_path / f"{family}.json"
        path.write_text(json.dumps(rows, ensure_ascii=False))
        ds = LlavaDataset(path, proc, d / "images", cache=False)
        assert not ds.index.exact.any()
        for i in range(len(ds)):
            assert ds.index.tokens[i] >= ds[i]["input_ids"].shape[0], (family, i)


# ---------------------------------------------------------------------- bad samples


def test_assistant_first_is_named(tiny, tmp_path):
    d = tiny["llava"]

    def swap(rows):
        rows[5]["conversations"] = rows[5]["conversations"][1:]

    with pytest.raises(DataError) as e:
        LlavaDataset(
            _copy(d, tmp_path, swap), AutoProcessor.from_pretrained(d / "model"), d / "images"
        )
    assert "sample 5 (id 's05'): the conversation starts with an assistant ('gpt') turn" in str(
        e.value
    )


def _truncate_png(d, tmp_path, name="s03.png"):
    """A copy of the images with one PNG cut after its header: it opens but does not decode."""
    import shutil

    images = tmp_path / "images"
    shutil.copytree(d / "images", images)
    data = (images / name).read_bytes()
    (images / name).write_bytes(data[: len(data) // 2])
    return images


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_image_raises_naming_the_sample(tiny, tmp_path, workers):
    d = tiny["llava"]
    images = _truncate_png(d, tmp_path)
    proc = AutoProcessor.from_pretrained(d / "model")
    ds = LlavaDataset(d / "data.json", proc, images, cache=False)  # the header passes
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=workers, collate_fn=Collator(0)
    )
    with pytest.raises(DataError) as e:
        list(loader)
    message = str(e.value)
    assert message.startswith(f"{d / 'data.json'}: sample 3 (id 's03'): ")
    assert "cannot read image" in message and "s03.png" in message
    assert "Traceback" not in message and "\n" not in message


def test_skip_replaces_a_bad_sample_by_one_of_its_modality(tiny, tmp_path):
    d = tiny["llava"]
    images = _truncate_png(d, tmp_path)
    proc = AutoProcessor.from_pretrained(d / "model")
    ds = LlavaDataset(d / "data.json", proc, images, on_bad_sample="skip", cache=False)
    with pytest.warns(UserWarning, match=r"skipped a bad sample .*sample 3 \(id 's03'\)"):
        enc = ds[3]
    assert torch.equal(enc["input_ids"], ds[4]["input_ids"])  # s04 is the next with an image
    assert int(enc[SKIPPED]) == 1
    batch = Collator(0)([enc, ds[2]])
    assert int(batch[SKIPPED]) == 1 and batch["input_ids"].shape[0] == 2


def test_skip_leaves_out_bad_records_at_start_up(tiny, tmp_path):
    d = tiny["llava"]

    def spoil(rows):
        rows[7]["conversations"] = [{"from": "robot", "value": "hi"}]
        rows[10]["image"] = "nowhere.png"

    path = _copy(d, tmp_path, spoil)
    proc = AutoProcessor.from_pretrained(d / "model")
    with pytest.warns(UserWarning, match=r"left out 2 bad sample\(s\)"):
        ds = LlavaDataset(path, proc, d / "images", on_bad_sample="skip", cache=False)
    assert len(ds) == 46
    assert "sample 7 (id 's07'): turn 0 must be" in ds.invalid[0]
    assert "sample 10 (id 's10'): image not found" in ds.invalid[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="sample 7"):
            LlavaDataset(path, proc, d / "images", cache=False)


# ---------------------------------------------------------------------- ranks build it together


def _shared_build(d, data, out) -> list[dict]:
    from launch import HERE, WORLD, launch_ranks

    out.mkdir()
    worker = f"{HERE}/data_index_worker.py"
    args = [str(data), str(d / "images"), str(d / "model"), str(out)]
    launch_ranks([worker, *args], timeout=120, what="the shared index build")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_index_together_as_one_process_does(tiny, tmp_path):
    """2 gloo ranks, each checking every other sample, gather the same index as one
    process alone; a bad sample in one rank's share stops both with its message."""
    d = tiny["llava"]
    alone = LlavaDataset(
        d / "data.json", AutoProcessor.from_pretrained(d / "model"), d / "images", cache=False
    )
    for rank in _shared_build(d, d / "data.json", tmp_path / "ok"):
        assert rank["len"] == len(alone)
        for key in index_mod.Index.ARRAYS:
            assert (rank[key] == getattr(alone.index, key)).all(), key
    assert len(list((tmp_path / "ok" / "cache").glob("*.npz"))) == 1  # one writer

    def spoil(rows):
        rows[7]["conversations"] = [{"from": "robot", "value": "hi"}]  # the 2nd rank's share

    bad = _copy(d, tmp_path, spoil)
    for rank in _shared_build(d, bad, tmp_path / "bad"):
        assert "sample 7 (id 's07'): turn 0 must be" in rank["error"]
