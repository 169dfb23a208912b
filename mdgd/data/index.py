"""The index of a LLaVA-format dataset: built in one pass over the file, cached on disk.

For each sample it records where it lies (file, byte offset, size), its modality
and LLaVA's length for grouping (the whitespace word count, negated for a
text-only sample, as LLaVA's ``modality_lengths``), and a token count that is
either exact or an upper bound. Building it checks every sample (structure,
roles, ``<image>`` counts, that every image file exists) without tokenizing
them, so that bad data fails before the model loads:

* **Token bound.** A tokenizer never makes more tokens than the UTF-8 bytes of
  its input, plus a few it adds per call (BOS/EOS, a SentencePiece prefix
  space). The rendered conversation is the chat template's text around the
  samples' text, and that text depends only on the conversation's *shape*
  (roles, and where images and text parts are): it is measured once per shape
  by rendering the shape with one-byte texts. So bound = template bytes of the
  shape + bytes of the texts - bytes of the image tokens in the text + the image
  tokens the processor expands them to (its own count; size-dependent only for
  tiling processors such as LLaVA-NeXT's, whose image headers are then read) +
  :data:`PER_CALL` per tokenizer call. The first samples of each shape are
  rendered to check that the template only adds text around them; if not, every
  sample is rendered.
* **Exact counts** only where the bound exceeds ``max_length``: those samples
  are tokenized (:func:`mdgd.data.tokens.token_ids`) and the ones truncation
  would empty are dropped, as before. LLaVA's 2048-token recipes have few such
  samples.

The index is cached under ``cache_dir`` keyed on the files (path, size, mtime),
the processor, ``max_length`` and ``on_bad_sample``. Processes that build it
apart share it through a file lock (the first builds it, the others wait and load
it); the ranks of a process group can instead build it together
(:func:`shared_build`: each checks every W-th sample, one all-gather). A relaunch
or resume loads it in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .records import DataError, check_record, checked_messages, image_files, sample_name
from .scan import DataFile, file_samples
from .tokens import assemble, chunks, encode_texts, render, token_ids, truncate

FORMAT = 1  # bump when the index's content changes meaning
PER_CALL = 4  # tokens a tokenizer call may add beyond one per input byte (BOS, EOS, prefix)
CHECKED_PER_SHAPE = 4  # samples of each conversation shape rendered to check the bound
EXACT_BATCH = 512  # samples counted exactly per batched tokenizer call
MARK = "\ue000{}\ue001"  # a text part's stand-in when a shape is measured (private-use chars)
MARK_RE = re.compile("\ue000(\\d+)\ue001")
PROBE_SIZES = ((1, 1), (336, 336), (480, 640), (640, 480), (2000, 300), (300, 2000))


def default_cache_dir() -> Path:
    """``$MDGD_DATA_CACHE``, else ``$XDG_CACHE_HOME/mdgd/data`` (``~/.cache/mdgd/data``)."""
    if os.environ.get("MDGD_DATA_CACHE"):
        return Path(os.environ["MDGD_DATA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mdgd" / "data"


@dataclass
class Index:
    """What :class:`mdgd.data.LlavaDataset` needs of its files; arrays over the kept samples."""

    files: list[str]
    file_id: np.ndarray  # int32: which of ``files``
    offset: np.ndarray  # int64: byte offset of the sample in its file
    size: np.ndarray  # int64: its bytes
    position: np.ndarray  # int64: its place in its file (how messages name it)
    lengths: np.ndarray  # int64: word count, negated when text-only (LLaVA's modality_lengths)
    tokens: np.ndarray  # int64: exact token count when ``exact``, else an upper bound
    exact: np.ndarray  # bool
    dropped: list[str] = field(default_factory=list)  # samples truncation would empty
    invalid: list[str] = field(default_factory=list)  # --on-bad-sample skip: why each went

    ARRAYS = ("file_id", "offset", "size", "position", "lengths", "tokens", "exact")

    def save(self, path: Path) -> None:
        meta = {"files": self.files, "dropped": self.dropped, "invalid": self.invalid}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(
                f, meta=np.array(json.dumps(meta)), **{k: getattr(self, k) for k in self.ARRAYS}
            )
        os.replace(tmp, path)  # readers see the whole file or none

    @classmethod
    def load(cls, path: Path) -> Index:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            return cls(**meta, **{k: z[k] for k in cls.ARRAYS})


class TokenBound:
    """Upper bounds on a conversation's tokens (the module doc), per processor."""

    def __init__(self, processor, first_special: bool) -> None:
        self.processor = processor
        self.first_special = first_special
        self.image_token_bytes = len(processor.image_token.encode("utf-8"))
        self.shapes: dict[tuple, Shape] = {}  # roles and part types -> its template text
        self.linear = True  # does the template only add text around the samples'?
        self.constant = self._constant_count()  # image tokens when size does not matter

    def _constant_count(self) -> int | None:
        counts = set()
        for size in PROBE_SIZES:
            try:
                counts.update(self.image_counts([size]))
            except (AttributeError, NotImplementedError, TypeError, IndexError, ValueError):
                return None
        return counts.pop() if len(counts) == 1 else None

    def image_counts(self, sizes: list[tuple[int, int]]) -> list[int]:
        """The processor's image-token count for each image (height, width)."""
        if not sizes:
            return []
        out = self.processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
        return [int(n) for n in out]

    def _shape(self, messages: list[dict]) -> Shape:
        key = tuple((m["role"], tuple(p["type"] for p in m["content"])) for m in messages)
        shape = self.shapes.get(key)
        if shape is None:
            shape = self.shapes[key] = Shape.measure(self.processor, messages)
        return shape

    def template_bytes(self, messages: list[dict]) -> int:
        shape = self._shape(messages)
        if self.linear and shape.checked < CHECKED_PER_SHAPE:
            shape.checked += 1
            rendered = len(render(self.processor, messages).encode("utf-8"))
            if rendered > shape.template_bytes + text_bytes(messages):
                self.linear = False
                warnings.warn(
                    "the chat template changes the samples' text (it renders more bytes than "
                    "its own text plus the samples'): every sample is rendered while the data "
                    "is indexed (slower start-up, once per data file and processor)",
                    stacklevel=4,
                )
        if not self.linear:
            return len(render(self.processor, messages).encode("utf-8")) - text_bytes(messages)
        return shape.template_bytes

    def bound(self, messages: list[dict], counts: list[int]) -> int:
        calls = 2 * sum(m["role"] == "assistant" for m in messages) + 1  # the chunks
        text = self.template_bytes(messages) + text_bytes(messages)
        return text - len(counts) * self.image_token_bytes + sum(counts) + PER_CALL * calls

    def exact(self, messages: list[dict], counts: list[int]) -> Any:
        """:func:`token_ids` of the conversation."""
        return token_ids(
            self.processor, messages, counts, self.first_special, self.pieces(messages)
        )

    def pieces(self, messages: list[dict]) -> list[tuple[str, bool]] | None:
        """The conversation's :func:`chunks` from its shape's, checked against one rendering
        (:func:`chunks` renders it once per turn); None when the shape's do not fit it."""
        shape = self._shape(messages)
        pieces = shape.pieces(messages)
        if pieces is not None and shape.verified < CHECKED_PER_SHAPE:
            shape.verified += 1  # as for the bound: the first few of a shape show the template
            if "".join(t for t, _ in pieces) != render(self.processor, messages):
                shape.marked = pieces = None  # it does more than put the texts in place
        return pieces


@dataclass
class Shape:
    """A conversation shape's template text: the chat template rendered with marker texts."""

    template_bytes: int  # bytes the template adds around the texts
    marked: list[tuple[str, bool]] | None  # chunks() of the marked conversation, if it split
    checked: int = 0  # samples of this shape rendered to check the bound
    verified: int = 0  # samples of this shape rendered to check its pieces

    @classmethod
    def measure(cls, processor, messages: list[dict]) -> Shape:
        marked, k = [], 0
        for m in messages:
            content = []
            for p in m["content"]:
                if p["type"] == "text":
                    p, k = dict(p, text=MARK.format(k)), k + 1
                content.append(p)
            marked.append({"role": m["role"], "content": content})
        full = render(processor, marked)
        markers = sum(len(MARK.format(i).encode("utf-8")) for i in range(k))
        try:
            pieces = chunks(processor, marked)
        except DataError:
            pieces = None
        if pieces is not None:  # every marker whole, once, in order, inside one piece
            found = [int(i) for text, _ in pieces for i in MARK_RE.findall(text)]
            pieces = pieces if found == list(range(k)) else None
        return cls(len(full.encode("utf-8")) - markers, pieces)

    def pieces(self, messages: list[dict]) -> list[tuple[str, bool]] | None:
        """The conversation's chunks(), its texts put in place of the markers."""
        if self.marked is None:
            return None
        texts = [p["text"] for m in messages for p in m["content"] if p["type"] == "text"]
        return [(MARK_RE.sub(lambda g: texts[int(g[1])], t), sup) for t, sup in self.marked]


def text_bytes(messages: list[dict]) -> int:
    return sum(
        len(p["text"].encode("utf-8"))
        for m in messages
        for p in m["content"]
        if p["type"] == "text"
    )


def fingerprint(processor) -> dict[str, Any]:
    """What of the processor decides the token counts (part of the cache key)."""
    tok = processor.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    image = getattr(processor, "image_processor", None)
    return {
        "processor": type(processor).__name__,
        "chat_template": processor.chat_template,
        "tokenizer": hashlib.sha256(vocab.encode("utf-8")).hexdigest(),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "image_processor": image.to_json_string() if image is not None else None,
        "image_token": processor.image_token,
    }


@dataclass
class Builder:
    """One pass over the data files: checks, lengths and token bounds (the module doc)."""

    image_folder: Path
    processor: Any
    bounds: TokenBound
    max_length: int | None
    image_token_id: int
    skip_bad: bool
    encode_full: Any  # sample -> Encoded, its images read
    rows: dict[str, list] = field(default_factory=lambda: {k: [] for k in Index.ARRAYS})
    invalid: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # image -> (height, width)
    exists: dict[str, bool] = field(default_factory=dict)
    counts_checked: bool | None = None  # did the processor's count match a full encoding?
    pending: list[tuple] = field(default_factory=list)  # samples to count exactly, batched
    dropped_rows: set[int] = field(default_factory=set)

    def add(self, file_id: int, path: Path, position: int, offset: int, size: int, rec) -> None:
        try:
            self._add(file_id, path, position, offset, size, rec)
        except DataError as e:
            if not self.skip_bad:
                raise
            self.invalid.append(str(e))

    def _add(self, file_id: int, path: Path, position: int, offset: int, size: int, rec) -> None:
        check_record(path, position, rec)
        where = f"{path}: {sample_name(position, rec)}"
        files = image_files(rec)
        try:
            messages = checked_messages(rec)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        for name in files:
            full = str(self.image_folder / name)
            if name not in self.exists:
                self.exists[name] = os.path.isfile(full)
            if not self.exists[name]:
                raise DataError(f"{where}: image not found: {full}")
        words = max(1, sum(len(t["value"].split()) for t in rec["conversations"]))
        exact = False
        try:
            counts = self._image_counts(files, where)
            if counts is not None and files and self.counts_checked is None:
                self.counts_checked = self._check_counts(rec, messages, counts)
            if counts is None or (files and not self.counts_checked):
                # the processor's counts are not to be trusted: read the images
                exact, tokens = True, self._fits(self.encode_full(rec))
            else:
                tokens = self.bounds.bound(messages, counts)
                if self.max_length is not None and tokens > self.max_length:
                    row = len(self.rows["offset"])  # counted exactly in flush()
                    self.pending.append((row, where, messages, counts))
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        except Exception as e:  # the chat template or the processor refused the sample
            raise DataError(
                f"{where}: cannot be rendered or tokenized ({type(e).__name__}: {e})"
            ) from None
        if tokens is None:
            self.dropped.append(where)
            return
        row = (file_id, offset, size, position, words if files else -words, tokens, exact)
        for key, value in zip(Index.ARRAYS, row):
            self.rows[key].append(value)

    def flush(self) -> None:
        """Count the pending samples exactly, their pieces tokenized in two batched calls."""
        batch, self.pending = self.pending, []
        pieces = []
        for _, _, messages, _ in batch:
            try:
                pieces.append(self.bounds.pieces(messages))
            except Exception as e:  # the chat template refused the sample
                pieces.append(e)
        tok, first = self.processor.tokenizer, self.bounds.first_special
        fast = [k for k, p in enumerate(pieces) if isinstance(p, list)]
        heads = encode_texts(tok, [pieces[k][0][0] for k in fast], first)
        tails = iter(encode_texts(tok, [t for k in fast for t, _ in pieces[k][1:]], False))
        encoded: dict[int, Any] = {}
        for k, head in zip(fast, heads):
            ids = [head] + [next(tails) for _ in pieces[k][1:]]
            encoded[k] = assemble(pieces[k], ids, batch[k][3], self.image_token_id_in_text)
        for k, (row, where, messages, counts) in enumerate(batch):
            try:
                if isinstance(pieces[k], Exception):
                    raise pieces[k]
                enc = encoded[k] if k in encoded else self.bounds.exact(messages, counts)
            except DataError as e:
                self._bad(row, f"{where}: {e}")
                continue
            except Exception as e:
                self._bad(
                    row, f"{where}: cannot be rendered or tokenized ({type(e).__name__}: {e})"
                )
                continue
            tokens = self._fits(enc)
            if tokens is None:
                self.dropped.append(where)
                self.dropped_rows.add(row)
            else:
                self.rows["tokens"][row], self.rows["exact"][row] = tokens, True

    def _bad(self, row: int, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message)
        self.invalid.append(message)
        self.dropped_rows.add(row)

    @property
    def image_token_id_in_text(self) -> int:
        """The id the tokenizer gives the processor's image token (before expansion)."""
        return self.processor.tokenizer.convert_tokens_to_ids(self.processor.image_token)

    def _fits(self, enc) -> int | None:
        n = int(enc["input_ids"].shape[0])
        if self.max_length is None or n <= self.max_length:
            return n
        return None if truncate(enc, self.max_length, self.image_token_id) is None else n

    def _image_counts(self, files: list[str], where: str) -> list[int] | None:
        if not files:
            return []
        if self.counts_checked is False:
            return None
        if self.bounds.constant is not None:
            return [self.bounds.constant] * len(files)
        sizes = [self._size(name, where) for name in files]
        try:
            return self.bounds.image_counts(sizes)
        except (AttributeError, NotImplementedError, TypeError, IndexError):
            self.counts_checked = False
            warnings.warn(
                f"{type(self.processor).__name__} does not count its image tokens from the "
                "image size: samples with images are read and processed while the data is "
                "indexed (slower start-up, once per data file and processor)",
                stacklevel=4,
            )
            return None

    def _size(self, name: str, where: str) -> tuple[int, int]:
        if name not in self.sizes:
            from PIL import Image, UnidentifiedImageError

            full = self.image_folder / name
            try:
                with Image.open(full) as im:  # reads the header only
                    self.sizes[name] = (im.height, im.width)
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"cannot read image {full} ({e})") from None
        return self.sizes[name]

    def _check_counts(self, rec, messages, counts) -> bool:
        """The processor's image-token count against a full encoding of the first image sample."""
        import torch

        full = self.encode_full(rec)
        counted = self.bounds.exact(messages, counts)
        same = all(torch.equal(full[k], counted[k]) for k in counted)
        if not same:
            warnings.warn(
                f"{type(self.processor).__name__}'s image-token count could not be predicted: "
                "samples with images are read and processed while the data is indexed "
                "(slower start-up, once per data file and processor)",
                stacklevel=4,
            )
        return same

    def index(self, files: list[str]) -> Index:
        self.flush()
        dtypes = {"file_id": np.int32, "exact": np.bool_}
        arrays = {k: np.asarray(v, dtype=dtypes.get(k, np.int64)) for k, v in self.rows.items()}
        if self.dropped_rows:
            keep = np.ones(len(arrays["offset"]), dtype=bool)
            keep[list(self.dropped_rows)] = False
            arrays = {k: v[keep] for k, v in arrays.items()}
        return Index(files, **arrays, dropped=self.dropped, invalid=self.invalid)


def build_index(
    files: list[DataFile], builder: Builder, progress: bool = True, share: tuple[int, int] = (0, 1)
) -> Index:
    """Scan ``files`` once with ``builder`` (a progress bar over their bytes).

    ``share=(r, n)``: check and bound only every n-th sample from the r-th (the others are
    decoded, to find where the next lies, and passed over): one part of a
    :func:`merge`-d index.
    """
    from tqdm.auto import tqdm

    total = sum(f.path.stat().st_size for f in files)
    name = files[0].path.name if len(files) == 1 else f"{len(files)} files"
    rank, parts = share
    seen = 0
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"mdgd: indexing {name}", disable=not progress
    ) as bar:
        for file_id, file in enumerate(files):
            for position, offset, size, rec in file_samples(file, bar.update):
                seen += 1
                if (seen - 1) % parts != rank:
                    continue
                builder.add(file_id, file.path, position, offset, size, rec)
                if len(builder.pending) >= EXACT_BATCH:
                    builder.flush()
    return builder.index([str(f.path) for f in files])


def merge(parts: list[Index]) -> Index:
    """One index from :func:`build_index`'s parts, its samples in file order."""
    arrays = {k: np.concatenate([getattr(p, k) for p in parts]) for k in Index.ARRAYS}
    order = np.lexsort((arrays["position"], arrays["file_id"]))
    return Index(
        parts[0].files,
        **{k: v[order] for k, v in arrays.items()},
        dropped=[d for p in parts for d in p.dropped],
        invalid=[d for p in parts for d in p.invalid],
    )


def shared_build(files: list[DataFile], builder: Builder, progress: bool) -> Index:
    """The index built by every rank of the default process group, each checking and
    bounding its share of the samples (:func:`build_index`), gathered and merged on every
    rank. A DataError on any rank is raised on every rank."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        part: Index | str = build_index(files, builder, progress and rank == 0, (rank, world))
    except DataError as e:
        part = str(e)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, part)
    errors = [p for p in parts if isinstance(p, str)]
    if errors:
        raise DataError(errors[0])
    return merge(parts)


def cache_key(files: list[DataFile], image_folder: Path, processor, **options: Any) -> str:
    stats = [
        {
            "path": str(f.path.resolve()),
            "size": (s := f.path.stat()).st_size,
            "mtime": s.st_mtime_ns,
            "sampling": f.sampling,
        }
        for f in files
    ]
    key = {
        "format": FORMAT,
        "files": stats,
        "image_folder": str(image_folder.resolve()),
        "processor": fingerprint(processor),
        **options,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_index(
    files: list[DataFile],
    builder: Builder,
    cache_dir: Path | None,
    key: str,
    progress: bool,
    shared: bool = False,
) -> Index:
    """The index from ``cache_dir`` (built and saved there first if absent; None: no cache).

    ``shared``: every rank of the default process group calls this, and they build it
    together (:func:`shared_build`) when one of them lacks it; else one process builds it
    and the others on the machine wait for it (a file lock).
    """
    if shared and _group_size() > 1:
        return _shared_cached(files, builder, cache_dir, key, progress)
    if cache_dir is None:
        return build_index(files, builder, progress)
    from filelock import FileLock, Timeout

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        warnings.warn(f"{cache_dir}: no data index cache ({e}); set --data-cache", stacklevel=3)
        return build_index(files, builder, progress)
    path = cache_dir / f"{key}.npz"
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:  # another rank (or run) is building it: wait, then load it
        print(f"mdgd: waiting for another process to index the data ({path})", file=sys.stderr)
        lock.acquire()
    try:
        index = load_cached(path)
        if index is not None:
            return index
        index = build_index(files, builder, progress)
        index.save(path)
        return index
    finally:
        lock.release()


def load_cached(path: Path) -> Index | None:
    """The index cached at ``path``; None when there is none (or it is unreadable: rebuilt)."""
    if not path.is_file():
        return None
    try:
        return Index.load(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: unreadable data index, rebuilt ({e})", stacklevel=3)
        return None


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _shared_cached(
    files: list[DataFile], builder: Builder, cache_dir: Path | None, key: str, progress: bool
) -> Index:
    import torch
    import torch.distributed as dist

    path = cache_dir / f"{key}.npz" if cache_dir is not None else None
    index = load_cached(path) if path is not None else None
    # build together unless every rank has it (a rank that skipped the gather would hang
    # the others); one tiny all-reduce decides
    missing = torch.tensor([float(index is None)])
    if dist.get_backend() == "nccl":
        missing = missing.cuda()
    dist.all_reduce(missing)
    if not missing.item():
        return index
    index = shared_build(files, builder, progress)
    if path is not None and int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
        try:  # one writer per machine; the file appears whole or not at all
            path.parent.mkdir(parents=True, exist_ok=True)
            index.save(path)
        except OSError as e:
            warnings.warn(f"{path}: the data index was not cached ({e})", stacklevel=3)
    return index
