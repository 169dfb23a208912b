"""LlavaDataset: a LLaVA-format file indexed once (:mod:`mdgd.data.index`), read lazily."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .index import Builder, TokenBound, cache_key, cached_index, default_cache_dir
from .records import DataError, checked_messages, image_files, sample_name
from .scan import data_files, read_sample
from .tokens import SKIPPED, Encoded, encode, first_special, render, truncate

BAD_SAMPLE = ("raise", "skip")
MAX_SKIPS = 100  # bad samples in a row before a skipping dataset gives up


class LlavaDataset(torch.utils.data.Dataset):
    """A LLaVA-format file tokenized with ``processor`` (the format: :mod:`mdgd.data`).

    Building it indexes the file (:mod:`mdgd.data.index`): every sample is
    checked (structure, roles, image files, ``<image>`` counts) and its length
    bounded, without tokenizing it, and the index is cached in ``cache_dir``
    (default :func:`~mdgd.data.index.default_cache_dir`; ``cache=False``: none), so a
    relaunch or a second rank loads it. Samples are read from the file, their
    images decoded and tokenized in ``__getitem__``, i.e. in the DataLoader workers.

    ``path`` is a JSON list, a JSON Lines file, or LLaVA-NeXT's YAML list of them.

    ``shared_build=True``: every rank of the default process group builds the dataset
    (as ``mdgd train`` does); they index the file together, each checking every W-th
    sample (one all-gather), instead of one building while the others wait.

    A sample that fails in ``__getitem__`` (an image that does not decode, a
    template that refuses it) raises a :class:`DataError` naming it
    (``on_bad_sample="raise"``), or is replaced by the next sample of the same
    modality and counted in the batch's ``mdgd_skipped_samples``
    (``on_bad_sample="skip"``, which also leaves out samples that fail the
    checks at start-up: :attr:`invalid`).

    Attributes:
        modality_lengths: per kept sample, its word count, negated when it has no
            image (LLaVA's lengths for ``group_by_modality_length``).
        dropped: the samples (named) truncation to ``max_length`` would empty.
        invalid: why each sample left out by ``on_bad_sample="skip"`` went.
        num_text_only: kept samples without an image.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        processor,
        image_folder: str | os.PathLike | None = None,
        max_length: int | None = None,
        image_token_id: int | None = None,
        *,
        on_bad_sample: str = "raise",
        cache_dir: str | os.PathLike | None = None,
        cache: bool = True,
        progress: bool = True,
        shared_build: bool = False,
    ) -> None:
        if on_bad_sample not in BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {BAD_SAMPLE}, got {on_bad_sample!r}")
        self.path = Path(path)
        self.files = data_files(self.path)
        self.processor = processor
        self.image_folder = (
            Path(image_folder) if image_folder is not None else self.files[0].path.parent
        )
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.image_token = getattr(processor, "image_token", None)
        if self.image_token is None:
            raise DataError(
                f"{type(processor).__name__} has no image_token: not a vision-language processor"
            )
        if image_token_id is None:
            image_token_id = processor.tokenizer.convert_tokens_to_ids(self.image_token)
        self.image_token_id = image_token_id
        self._first = first_special(processor)
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()
        where = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.index = self._load_index(where if cache else None, progress, shared_build)
        self.modality_lengths = self.index.lengths
        self.dropped = self.index.dropped
        self.invalid = self.index.invalid
        if self.invalid:
            warnings.warn(
                f"{self.path}: left out {len(self.invalid)} bad sample(s) (--on-bad-sample "
                f"skip); the first: {self.invalid[0]}",
                stacklevel=2,
            )
        if self.dropped:
            warnings.warn(
                f"{self.path}: dropped {len(self.dropped)} of {len(self.dropped) + len(self)} "
                f"sample(s) whose answers do not fit in max_length={max_length} tokens "
                f"(first: {self.dropped[0]}); raise --max-length to keep them",
                stacklevel=2,
            )
        if len(self) == 0:
            raise DataError(
                f"{self.path}: no sample left ({len(self.dropped)} dropped for max_length="
                f"{max_length}, {len(self.invalid)} bad)"
            )
        self.num_text_only = int((self.modality_lengths < 0).sum())

    def _load_index(self, cache_dir: Path | None, progress: bool, shared: bool):
        bounds = TokenBound(self.processor, self._first)
        builder = Builder(
            self.image_folder,
            self.processor,
            bounds,
            self.max_length,
            self.image_token_id,
            self.on_bad_sample == "skip",
            self._encode_record,
        )
        key = cache_key(
            self.files,
            self.image_folder,
            self.processor,
            max_length=self.max_length,
            image_token_id=self.image_token_id,
            on_bad_sample=self.on_bad_sample,
        )
        return cached_index(self.files, builder, cache_dir, key, progress, shared)

    def __len__(self) -> int:
        return len(self.index.offset)

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _handles={})  # file handles stay in their process

    # ------------------------------------------------------------------ one sample

    def _file(self, i: int):
        if self._pid != os.getpid():  # a forked worker: its own handles, not the parent's offsets
            self._handles, self._pid = {}, os.getpid()
        fid = int(self.index.file_id[i])
        if fid not in self._handles:
            self._handles[fid] = open(self.index.files[fid], "rb")  # noqa: SIM115
        return self._handles[fid]

    def name(self, i: int, rec: dict | None = None) -> str:
        """``data.json: sample 12 (id 'abc')``: how messages name kept sample ``i``."""
        return f"{self.index.files[int(self.index.file_id[i])]}: " + sample_name(
            int(self.index.position[i]), rec if rec is not None else {}
        )

    def record(self, i: int) -> dict:
        """Kept sample ``i`` as in the file."""
        return read_sample(self._file(i), int(self.index.offset[i]), int(self.index.size[i]))

    def _open(self, rec: dict) -> list:
        """The sample's images, decoded to RGB (a DataError names an unreadable one)."""
        from PIL import Image, UnidentifiedImageError

        out = []
        for name in image_files(rec):
            path = self.image_folder / name
            try:
                with Image.open(path) as im:
                    out.append(im.convert("RGB"))  # decodes the whole image
            except (OSError, UnidentifiedImageError) as e:
                raise DataError(f"cannot read image {path} ({e})") from None
        return out

    def _encode_record(self, rec: dict) -> Encoded:
        return encode(self.processor, checked_messages(rec), self._open(rec), self._first)

    def _item(self, i: int) -> Encoded:
        rec = self.record(i)
        try:
            enc = self._encode_record(rec)
            if self.max_length is not None:
                enc = truncate(enc, self.max_length, self.image_token_id)
                if enc is None:
                    raise DataError(f"no answer left after truncation to {self.max_length} tokens")
        except DataError as e:
            raise DataError(f"{self.name(i, rec)}: {e}") from None
        except Exception as e:  # the template, the processor or an image refused the sample
            raise DataError(f"{self.name(i, rec)}: {type(e).__name__}: {e}") from None
        return enc

    def __getitem__(self, i: int) -> Encoded:
        if self.on_bad_sample == "raise":
            return self._item(i)
        text_only = self.modality_lengths[i] < 0
        for skipped in range(MAX_SKIPS):
            try:
                enc = self._item(i)
            except DataError as e:
                warnings.warn(f"skipped a bad sample (--on-bad-sample skip): {e}", stacklevel=2)
                last, i = e, self._next_alike(i, text_only)
                continue
            if skipped:
                enc[SKIPPED] = torch.tensor(skipped)
            return enc
        raise DataError(f"{self.path}: {MAX_SKIPS} bad samples in a row; the last: {last}")

    def _next_alike(self, i: int, text_only: bool) -> int:
        """The next kept sample after ``i`` (cyclically) of the same modality."""
        same = (self.modality_lengths < 0) == text_only
        later = same.nonzero()[0]
        after = later[later > i]
        return int(after[0] if len(after) else later[0])

    def prompt(self, i: int) -> tuple[dict[str, torch.Tensor], str]:
        """The inputs of sample ``i``'s first prompt (with generation prompt), and its answer."""
        rec = self.record(i)
        messages = checked_messages(rec)
        a = next(k for k, m in enumerate(messages) if m["role"] == "assistant")
        answer = " ".join(p["text"] for p in messages[a]["content"] if p["type"] == "text")
        text = render(self.processor, messages[:a], generation_prompt=True)
        n = text.count(self.image_token)
        images = self._open(rec)[:n]
        inputs = self.processor(
            text=[text], images=images or None, add_special_tokens=self._first, return_tensors="pt"
        )
        return dict(inputs), answer
