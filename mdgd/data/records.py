"""LLaVA's JSON format: loading a file, checking each sample, turns as chat messages.

Every problem is a :class:`DataError` naming the file and the sample (index and
id) or the line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
PLACEHOLDER = "<image>"  # LLaVA's image placeholder in the data, whatever the processor's token


class DataError(ValueError):
    """Bad training data: the message names the file, the sample and what is wrong."""

    def __init__(self, message: str) -> None:
        # torch's DataLoader re-raises a worker's exception as ``type(e)(text)``, where the
        # text is the worker's whole traceback; keep only the message it ends with, so
        # that `mdgd train` still prints one line naming the sample
        marker = f"{__name__}.{type(self).__qualname__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def load_records(path: str | os.PathLike) -> list[dict]:
    """The samples of a LLaVA-format JSON or JSON Lines file, checked for structure, in memory.

    For small files (e.g. ``--eval-data``); :class:`mdgd.data.LlavaDataset` reads large
    ones lazily.
    """
    from .scan import data_files, file_samples

    records = []
    for file in data_files(path):
        for i, _, _, rec in file_samples(file):
            check_record(file.path, i, rec)
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no samples")
    return records


def sample_name(index: int, rec: Any) -> str:
    """``sample 3 (id 'abc')``: how messages name a sample."""
    sid = rec.get("id") if isinstance(rec, dict) else None
    return f"sample {index}" + (f" (id {sid!r})" if sid is not None else "")


def check_record(path: Path, i: int, rec: Any) -> None:
    """Raise a DataError naming sample ``i`` of ``path`` unless it is a well-formed sample."""
    where = f"{path}: {sample_name(i, rec)}"
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
    first = next((turn for turn in conv if ROLES[turn["from"]] != "system"), None)
    if first is not None and ROLES[first["from"]] == "assistant":
        raise DataError(
            f"{where}: the conversation starts with an assistant ({first['from']!r}) turn: "
            "the first turn after any system turn must be the user's ('human'), which the "
            "assistant answers"
        )
    image = rec.get("image")
    if image is not None and not (
        isinstance(image, str)
        or (isinstance(image, list) and all(isinstance(x, str) for x in image))
    ):
        raise DataError(
            f"{where}: 'image' must be a file name or a list of them, got {image!r:.60}"
        )


def image_files(rec: dict) -> list[str]:
    """The image files of a sample (none for a text-only one)."""
    image = rec.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def checked_messages(rec: dict) -> list[dict]:
    """The sample's turns as chat messages, once its ``<image>`` placeholders are checked
    against its image files (a DataError that the caller prefixes with the sample's name)."""
    count = sum(t["value"].count(PLACEHOLDER) for t in rec["conversations"])
    if count != len(image_files(rec)):
        raise DataError(
            f"{count} {PLACEHOLDER} placeholder(s) in the conversation but "
            f"{len(image_files(rec))} image(s)"
        )
    return to_messages(rec["conversations"])


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
