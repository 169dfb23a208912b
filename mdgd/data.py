"""LLaVA-format instruction data for ``mdgd train``: loading, chat template, labels, batches.

The input is LLaVA's format, a JSON list (or JSON Lines, one sample a line) of

    {"id": "...", "image": "file.png",            # "image" absent: a text-only sample
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"},
                       {"from": "gpt", "value": "..."}, ...]}

(``"image"`` may also be a list of files, one per ``<image>``.) Each sample is
rendered with the model's own processor and chat template, so the tokens are
the ones ``processor.apply_chat_template`` gives at inference time. Only the
assistant turns are supervised: every other position of ``labels`` is -100.
An assistant turn is found as the text the template adds between the
conversation rendered up to the turn (with the generation prompt) and rendered
through it, so it includes what the template closes the turn with (e.g.
``</s>``), and the model learns to stop. Text-only samples are kept.

Samples longer than ``max_length`` tokens are truncated; one whose answers (or
an image's tokens) would be cut entirely is dropped, counted in
:attr:`LlavaDataset.dropped`, with one warning. Every problem in the input is a
:class:`DataError` whose message names the sample (index and id) or the line.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
IGNORE = -100
PLACEHOLDER = "<image>"  # LLaVA's image placeholder in the data, whatever the processor's token


class DataError(ValueError):
    """Bad training data: the message names the file, the sample and what is wrong."""


def load_records(path: str | os.PathLike) -> list[dict]:
    """The samples of a LLaVA-format JSON or JSON Lines file, checked for structure."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (text.lstrip()[:1] == "{"):
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})"
            ) from None
        if not isinstance(records, list):
            raise DataError(
                f"{path}: expected a JSON list of samples, got {type(records).__name__}"
            )
    for i, rec in enumerate(records):
        _check_record(path, i, rec)
    if not records:
        raise DataError(f"{path}: no samples")
    return records


def _where(index: int, rec: Any) -> str:
    sid = rec.get("id") if isinstance(rec, dict) else None
    return f"sample {index}" + (f" (id {sid!r})" if sid is not None else "")


def _check_record(path: Path, i: int, rec: Any) -> None:
    where = f"{path}: {_where(i, rec)}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with 'conversations', got {rec!r:.60}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    for t, turn in enumerate(conv):
        ok = isinstance(turn, dict) and isinstance(turn.get("from"), str)
        ok = ok and turn["from"] in ROLES
        if not ok or not isinstance(turn.get("value"), str):
            raise DataError(
                f'{where}: turn {t} must be {{"from": one of {sorted(ROLES)}, "value": '
                f"a string}}, got {turn!r:.80}"
            )
    if not any(ROLES[turn["from"]] == "assistant" for turn in conv):
        raise DataError(f"{where}: no assistant ('gpt') turn, nothing to learn from")
    image = rec.get("image")
    if image is not None and not (
        isinstance(image, str)
        or (isinstance(image, list) and all(isinstance(x, str) for x in image))
    ):
        raise DataError(
            f"{where}: 'image' must be a file name or a list of them, got {image!r:.60}"
        )


def image_files(rec: dict) -> list[str]:
    image = rec.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def to_messages(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA turns as Hugging Face chat messages; ``<image>`` becomes an image part."""
    messages = []
    for turn in conversations:
        role = ROLES[turn["from"]]
        pieces = turn["value"].split(PLACEHOLDER)
        content: list[dict] = []
        for k, piece in enumerate(pieces):
            if k:
                content.append({"type": "image"})
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
        messages.append({"role": role, "content": content})
    return messages


def _render(processor, messages: list[dict], generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def chunks(processor, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into ``(text, supervised)`` pieces, in order."""
    full = _render(processor, messages)
    out, cursor = [], 0
    for a, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(processor, messages[:a], generation_prompt=True)
        through = _render(processor, messages[: a + 1])
        if not (through.startswith(prompt) and full.startswith(through) and len(prompt) >= cursor):
            raise DataError(
                "the chat template does not render a conversation's turns as prefixes of one "
                "another, so its assistant turns cannot be located; use a processor whose "
                "template renders each turn after the previous ones"
            )
        out += [(full[cursor : len(prompt)], False), (full[len(prompt) : len(through)], True)]
        cursor = len(through)
    out.append((full[cursor:], False))
    return [(text, sup) for text, sup in out if text]


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding the other dims to the largest (e.g. image tiles)."""
    if len(tensors) == 1:
        return tensors[0]
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = tensors[0].new_zeros(sum(t.shape[0] for t in tensors), *shape)
    row = 0
    for t in tensors:
        out[(slice(row, row + t.shape[0]),) + tuple(slice(0, s) for s in t.shape[1:])] = t
        row += t.shape[0]
    return out


class Encoded(dict):
    """One sample: 1-D ``input_ids``, ``labels`` and per-token tensors, image tensors batched."""


def encode(processor, messages: list[dict], images: list, first_special: bool) -> Encoded:
    """Tokenize a conversation piece by piece with the processor (images expanded by it).

    Returns ``input_ids``, ``labels`` (-100 off the assistant turns), the
    processor's other per-token outputs (1-D) and its image outputs (``[n, ...]``).
    """
    image_token = processor.image_token
    image_keys = set(processor.image_processor.model_input_names)
    per_token: dict[str, list[torch.Tensor]] = {}
    per_image: dict[str, list[torch.Tensor]] = {}
    labels, used = [], 0
    for k, (text, supervised) in enumerate(chunks(processor, messages)):
        n = text.count(image_token)
        out = processor(
            text=[text],
            images=images[used : used + n] or None,
            add_special_tokens=first_special and k == 0,
            return_tensors="pt",
        )
        used += n
        ids = out["input_ids"][0]
        labels.append(ids.clone() if supervised else torch.full_like(ids, IGNORE))
        for key, val in out.items():
            if not isinstance(val, torch.Tensor):
                continue
            if key in image_keys:
                per_image.setdefault(key, []).append(val)
            else:  # [1, length]
                per_token.setdefault(key, []).append(val[0])
    enc = Encoded({k: torch.cat(v) for k, v in per_token.items()})
    enc["labels"] = torch.cat(labels)
    enc.update({k: _cat_padded(v) for k, v in per_image.items()})
    return enc


def token_ids(processor, messages: list[dict], counts: list[int], first_special: bool) -> Encoded:
    """``input_ids`` and ``labels`` of :func:`encode` without reading an image.

    Each image token is repeated ``counts[i]`` times (``processor._get_num_multimodal_tokens``),
    which is how LLaVA-style processors expand it; :class:`LlavaDataset` checks that
    on its first sample with an image before relying on it.
    """
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(processor.image_token)
    ids_out, labels, used = [], [], 0
    for k, (text, supervised) in enumerate(chunks(processor, messages)):
        ids = []
        for t in tok(text, add_special_tokens=first_special and k == 0)["input_ids"]:
            if t == image_id:
                ids += [t] * counts[used]
                used += 1
            else:
                ids.append(t)
        ids_out += ids
        labels += ids if supervised else [IGNORE] * len(ids)
    return Encoded(input_ids=torch.tensor(ids_out), labels=torch.tensor(labels))


def _truncate(enc: Encoded, max_length: int, image_token_id: int) -> Encoded | None:
    """``enc`` cut to ``max_length`` tokens, or None when no answer (or an image) would survive."""
    n = enc["input_ids"].shape[0]
    if n <= max_length:
        return enc
    ids = enc["input_ids"]
    cut_images = bool((ids[max_length:] == image_token_id).any())
    if cut_images or not bool((enc["labels"][:max_length] != IGNORE).any()):
        return None
    return Encoded(
        {k: (v[:max_length] if v.dim() == 1 and v.shape[0] == n else v) for k, v in enc.items()}
    )


class LlavaDataset(torch.utils.data.Dataset):
    """A LLaVA-format file tokenized with ``processor`` (see the module docstring).

    Building it checks every sample (structure, image files, ``<image>`` counts)
    and tokenizes its text, so that bad input fails before training and the
    samples truncation drops are known. It reads only the images' headers: the
    image tokens are counted with the processor's own formula, once checked
    against a full encoding of the first sample with an image (when they differ,
    every image is processed up front instead, with a warning). ``__getitem__``
    encodes a sample in full, images included.

    Attributes:
        records: the kept samples (dicts as in the file, plus ``_index``: the position
            in the file).
        dropped: indices (in the file) of the samples dropped for ``max_length``.
        num_text_only: kept samples without an image.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        processor,
        image_folder: str | os.PathLike | None = None,
        max_length: int | None = None,
        image_token_id: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.processor = processor
        self.image_folder = Path(image_folder) if image_folder is not None else self.path.parent
        self.max_length = max_length
        self.image_token = getattr(processor, "image_token", None)
        if self.image_token is None:
            raise DataError(
                f"{type(processor).__name__} has no image_token: not a vision-language processor"
            )
        if image_token_id is None:
            image_token_id = processor.tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_token_id = image_token_id
        self._first = _first_special(processor)
        self._fast: bool | None = None  # image-token counts trusted? (decided on first image)
        self.records: list[dict] = []
        self.dropped: list[int] = []
        for i, rec in enumerate(load_records(self.path)):
            if self._fits(i, rec):
                self.records.append(dict(rec, _index=i))
            else:
                self.dropped.append(i)
        if self.dropped:
            warnings.warn(
                f"{self.path}: dropped {len(self.dropped)} of {len(self.dropped) + len(self)} "
                f"sample(s) whose answers do not fit in max_length={max_length} tokens "
                f"(first: {_where(self.dropped[0], {})}); raise --max-length to keep them",
                stacklevel=2,
            )
        if not self.records:
            raise DataError(f"{self.path}: no sample left after truncation to {max_length} tokens")
        self.num_text_only = sum(1 for r in self.records if not image_files(r))

    def __len__(self) -> int:
        return len(self.records)

    def _paths(self, index: int, rec: dict) -> list[Path]:
        paths = [self.image_folder / name for name in image_files(rec)]
        for path in paths:
            if not path.is_file():
                raise DataError(f"{self.path}: {_where(index, rec)}: image not found: {path}")
        return paths

    def _open(self, index: int, rec: dict, convert: bool) -> list:
        """The sample's images (RGB), or with ``convert=False`` their (height, width) only."""
        from PIL import Image, UnidentifiedImageError

        out = []
        for path in self._paths(index, rec):
            try:
                with Image.open(path) as im:  # reads the header; convert() decodes
                    out.append(im.convert("RGB") if convert else (im.height, im.width))
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(
                    f"{self.path}: {_where(index, rec)}: cannot read image {path} ({e})"
                ) from None
        return out

    def _messages(self, index: int, rec: dict) -> list[dict]:
        files = image_files(rec)
        count = sum(t["value"].count(PLACEHOLDER) for t in rec["conversations"])
        if count != len(files):
            raise DataError(
                f"{self.path}: {_where(index, rec)}: {count} {PLACEHOLDER} placeholder(s) in "
                f"the conversation but {len(files)} image(s)"
            )
        return to_messages(rec["conversations"])

    def _named(self, index: int, rec: dict, build):
        try:
            return build()
        except DataError as e:
            raise DataError(f"{self.path}: {_where(index, rec)}: {e}") from None

    def _encode(self, index: int, rec: dict) -> Encoded:
        messages, images = self._messages(index, rec), self._open(index, rec, convert=True)
        return self._named(
            index, rec, lambda: encode(self.processor, messages, images, self._first)
        )

    def _counted(self, index: int, rec: dict, sizes: list[tuple[int, int]]) -> Encoded:
        counts = []
        if sizes:
            counts = self.processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
        messages = self._messages(index, rec)
        return self._named(
            index, rec, lambda: token_ids(self.processor, messages, list(counts), self._first)
        )

    def _fits(self, index: int, rec: dict) -> bool:
        """Check sample ``index``; False when truncation to ``max_length`` drops it."""
        sizes = self._open(index, rec, convert=False)
        if sizes and self._fast is None:
            self._fast = self._counts_match(index, rec, sizes)
        if sizes and not self._fast:
            enc = self._encode(index, rec)
        else:
            enc = self._counted(index, rec, sizes)
        if self.max_length is None:
            return True
        return _truncate(enc, self.max_length, self.image_token_id) is not None

    def _counts_match(self, index: int, rec: dict, sizes: list[tuple[int, int]]) -> bool:
        full = self._encode(index, rec)
        try:
            counted = self._counted(index, rec, sizes)
        except (AttributeError, NotImplementedError, TypeError, IndexError):
            counted = None
        same = counted is not None and all(torch.equal(full[k], counted[k]) for k in counted)
        if not same:
            warnings.warn(
                f"{type(self.processor).__name__}'s image-token count could not be predicted: "
                "every image is read and processed while the dataset is built (slower start-up)",
                stacklevel=3,
            )
        return same

    def __getitem__(self, i: int) -> Encoded:
        rec = self.records[i]
        enc = self._encode(rec["_index"], rec)
        if self.max_length is not None:
            enc = _truncate(enc, self.max_length, self.image_token_id)
        if enc is None:  # the file changed under us
            raise DataError(f"{self.path}: {_where(rec['_index'], rec)} no longer fits max_length")
        return enc

    def prompt(self, i: int) -> tuple[dict[str, torch.Tensor], str]:
        """The inputs of sample ``i``'s first prompt (with generation prompt), and its answer."""
        rec = self.records[i]
        messages = self._messages(rec["_index"], rec)
        a = next(k for k, m in enumerate(messages) if m["role"] == "assistant")
        answer = " ".join(p["text"] for p in messages[a]["content"] if p["type"] == "text")
        text = _render(self.processor, messages[:a], generation_prompt=True)
        n = text.count(self.image_token)
        images = self._open(rec["_index"], rec, convert=True)[:n]
        inputs = self.processor(
            text=[text], images=images or None, add_special_tokens=self._first, return_tensors="pt"
        )
        return dict(inputs), answer


def _first_special(processor) -> bool:
    """Whether the first piece gets the tokenizer's special tokens: as
    ``ProcessorMixin.apply_chat_template(tokenize=True)``, not when the template writes BOS."""
    bos = processor.tokenizer.bos_token
    probe = _render(processor, [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    return not (bos is not None and probe.startswith(bos))


def collate(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded samples into a batch (labels with -100, masks with 0)."""
    length = max(s["input_ids"].shape[0] for s in samples)
    batch: dict[str, torch.Tensor] = {}
    token_keys = [
        k
        for k, v in samples[0].items()
        if v.dim() == 1 and v.shape[0] == samples[0]["input_ids"].shape[0]
    ]
    for key in token_keys:
        fill = pad_token_id if key == "input_ids" else IGNORE if key == "labels" else 0
        rows = [s[key] for s in samples]
        out = rows[0].new_full((len(rows), length), fill)
        for r, row in enumerate(rows):
            out[r, : row.shape[0]] = row
        batch[key] = out
    image_keys = {k for s in samples for k in s if k not in token_keys}
    for key in sorted(image_keys):
        parts = [s[key] for s in samples if key in s]
        batch[key] = _cat_padded(parts)
    return batch


class Collator:
    """``data_collator`` for the Trainer: :func:`collate` with the tokenizer's pad id."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        return collate(samples, self.pad_token_id)
