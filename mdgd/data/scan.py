"""Where each sample of a LLaVA-format file lies: one streaming pass, then one sample by its place.

LLaVA's 665K mix is one JSON list of about a gigabyte. ``json.load`` of it
holds every sample as Python objects (several times the file's size, on every
rank); this module instead decodes the file block by block and yields each
sample with its byte offset and size, so that a sample is read again later
with one ``seek`` and one ``json.loads`` (:func:`read_sample`), in the
DataLoader worker that needs it. JSON Lines and LLaVA-NeXT's YAML list of
files (:func:`data_files`) are read the same way.

Errors name the file and the place: the line and column of bad JSON, the byte
offset of bytes that are not UTF-8.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import DataError

BLOCK = 16 << 20  # bytes decoded at a time
MAX_SAMPLE = 64 << 20  # a sample longer than this is taken for bad JSON, not read on
WHITESPACE = " \t\n\r"
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class DataFile:
    """One JSON or JSON Lines file of the data and which of its samples to use."""

    path: Path
    sampling: str = "all"  # LLaVA-NeXT's sampling_strategy: all, first:N, end:N, random:N[%]


def data_files(path: str | os.PathLike) -> list[DataFile]:
    """The files ``--data`` names: itself, or the ``json_path`` entries of a LLaVA-NeXT YAML.

    The YAML is ``datasets: [{json_path: FILE, sampling_strategy: all|first:N|end:N|random:N}]``
    (N a count or a percentage); relative paths start at the YAML's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix not in YAML_SUFFIXES:
        return [DataFile(path)]
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a valid YAML file ({str(e).splitlines()[0]})") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(
            f"{path}: expected LLaVA-NeXT's layout, 'datasets: [{{json_path: FILE, "
            "sampling_strategy: all}, ...]'"
        )
    out = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("json_path"), str):
            raise DataError(f"{path}: datasets[{k}] has no json_path, got {entry!r:.80}")
        sampling = str(entry.get("sampling_strategy", "all"))
        parse_sampling(sampling, f"{path}: datasets[{k}]")
        file = Path(entry["json_path"]).expanduser()
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise DataError(f"{path}: datasets[{k}]: no such data file: {file}")
        if file.suffix in YAML_SUFFIXES:
            raise DataError(f"{path}: datasets[{k}]: {file} is a YAML file, not JSON")
        out.append(DataFile(file, sampling))
    return out


def parse_sampling(sampling: str, where: str) -> tuple[str, float | int]:
    """``("first", 100)``, ``("random", 0.1)`` (a fraction) or ``("all", 0)``."""
    if sampling == "all":
        return "all", 0
    m = re.fullmatch(r"(first|end|random):(\d+(?:\.\d+)?)(%?)", sampling)
    if m is None:
        raise DataError(
            f"{where}: sampling_strategy must be all, first:N, end:N or random:N "
            f"(N a count or a percentage), got {sampling!r}"
        )
    how, number, percent = m.groups()
    return how, float(number) / 100 if percent else int(float(number))


def sample_positions(n: int, sampling: str, where: str) -> range | list[int]:
    """The positions of the samples ``sampling`` keeps out of ``n``, in file order."""
    how, amount = parse_sampling(sampling, where)
    if how == "all":
        return range(n)
    count = min(n, round(amount * n) if isinstance(amount, float) else amount)
    if how == "first":
        return range(count)
    if how == "end":
        return range(n - count, n)
    return sorted(random.Random(0).sample(range(n), count))  # seeded: the same on every rank


def scan(
    path: Path, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, int, Any]]:
    """``(byte offset, byte size, sample)`` for each sample of a JSON list or JSON Lines file.

    ``progress(n)`` is called with the bytes read since its last call.
    """
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf" + WHITESPACE.encode())
    if path.suffix == ".jsonl" or head[:1] == b"{":
        yield from _scan_lines(path, progress)
    else:
        yield from _scan_list(path, progress)


def file_samples(file: DataFile, progress=None) -> Iterator[tuple[int, int, int, Any]]:
    """``(position, byte offset, byte size, sample)`` of the samples ``file.sampling`` keeps."""
    if file.sampling == "all":
        for position, (offset, size, rec) in enumerate(scan(file.path, progress)):
            yield position, offset, size, rec
        return
    places = [(offset, size) for offset, size, _ in scan(file.path, progress)]
    with open(file.path, "rb") as f:
        for position in sample_positions(len(places), file.sampling, str(file.path)):
            yield position, *places[position], read_sample(f, *places[position])


def read_sample(f, offset: int, size: int) -> Any:
    """The sample at ``offset`` (``size`` bytes) of the open binary file ``f``."""
    f.seek(offset)
    return json.loads(f.read(size))


def _not_utf8(path: Path, offset: int, e: UnicodeDecodeError) -> DataError:
    bad = e.object[e.start : e.start + 1].hex()
    return DataError(
        f"{path}: not UTF-8: byte 0x{bad} at byte offset {offset} ({e.reason}); LLaVA data is "
        "UTF-8 JSON: re-encode the file (e.g. iconv -f latin1 -t utf-8)"
    )


def _scan_lines(path: Path, progress) -> Iterator[tuple[int, int, Any]]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            size = len(line)
            if line.strip():
                try:
                    sample = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise _not_utf8(path, offset + e.start, e) from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
                yield offset, len(line.rstrip(b"\r\n")), sample
            offset += size
            if progress is not None:
                progress(size)


class _Text:
    """The file decoded block by block; ``pos`` indexes ``text``, ``byte`` is its offset."""

    def __init__(self, path: Path, progress) -> None:
        self.path, self.progress = path, progress
        self.f = open(path, "rb")  # noqa: SIM115  (closed by close())
        self.text, self.pos, self.byte, self.read_bytes = "", 0, 0, 0
        self.ascii, self.pending, self.eof = True, b"", False
        bom = self.f.read(3)
        if bom == b"\xef\xbb\xbf":
            self.byte = self.read_bytes = 3
        else:
            self.f.seek(0)

    def close(self) -> None:
        self.f.close()

    def fill(self) -> bool:
        """Append the next block to the unread text; False at the end of the file."""
        if self.eof:
            return False
        block = self.f.read(BLOCK)
        start = self.read_bytes - len(self.pending)  # file offset of pending + block
        self.read_bytes += len(block)
        if self.progress is not None:
            self.progress(len(block))
        data = self.pending + block
        cut = len(data)
        if not block:
            self.eof = True
        else:  # a character split by the block's end waits for the next block
            for back in range(1, min(4, len(data)) + 1):
                b = data[-back]
                if b & 0xC0 != 0x80:  # the last character's first byte
                    need = 1 if b < 0xC0 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
                    if need > back:
                        cut = len(data) - back
                    break
        try:
            new = data[:cut].decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(self.path, start + e.start, e) from None
        self.pending = data[cut:]
        if self.eof and self.pending:
            raise DataError(f"{self.path}: not UTF-8: the file ends inside a character")
        rest = self.text[self.pos :]
        self.text, self.pos = rest + new, 0
        self.ascii = self.text.isascii()
        return bool(new) or not self.eof

    def advance(self, to: int) -> None:
        """Move ``pos`` to ``to``, keeping ``byte`` its offset in the file."""
        piece = self.text[self.pos : to]
        self.byte += len(piece) if self.ascii else len(piece.encode("utf-8"))
        self.pos = to

    def skip_space(self) -> str:
        """The next character that is not whitespace ('' at the end of the file), not consumed."""
        while True:
            n = len(self.text)
            while self.pos < n and self.text[self.pos] in WHITESPACE:
                self.advance(self.pos + 1)
            if self.pos < n:
                return self.text[self.pos]
            if not self.fill():
                return ""

    def error(self, at: int, msg: str) -> DataError:
        """A DataError for bad JSON at text position ``at``, with line and column."""
        piece = self.text[self.pos : at]
        offset = self.byte + (len(piece) if self.ascii else len(piece.encode("utf-8")))
        with open(self.path, "rb") as f:
            before = f.read(offset)
        line = before.count(b"\n") + 1
        column = len(before) - (before.rfind(b"\n") + 1) + 1
        return DataError(f"{self.path}: not valid JSON at line {line}, column {column} ({msg})")


def _scan_list(path: Path, progress) -> Iterator[tuple[int, int, Any]]:
    decode = json.JSONDecoder().raw_decode
    t = _Text(path, progress)
    try:
        if t.skip_space() != "[":
            raise t.error(t.pos, "expected a JSON list of samples, '[' ... ']'")
        t.advance(t.pos + 1)
        if t.skip_space() == "]":
            t.advance(t.pos + 1)
        else:
            while True:
                if t.skip_space() == "":
                    raise t.error(t.pos, "the list is not closed with ']'")
                while True:
                    try:
                        sample, end = decode(t.text, t.pos)
                        break
                    except json.JSONDecodeError as e:
                        # at the end of the decoded text the sample may continue in the next block
                        if t.eof or len(t.text) - t.pos > MAX_SAMPLE:
                            raise t.error(e.pos, e.msg) from None
                        t.fill()
                start = t.byte
                t.advance(end)
                yield start, t.byte - start, sample
                sep = t.skip_space()
                if sep == "]":
                    t.advance(t.pos + 1)
                    break
                if sep != ",":
                    raise t.error(t.pos, "Expecting ',' delimiter" if sep else "unexpected end")
                t.advance(t.pos + 1)
        if t.skip_space() != "":
            raise t.error(t.pos, "Extra data after the list")
    finally:
        t.close()
