"""LlavaDataset: a LLaVA-format file checked, tokenized and truncated up front."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .records import PLACEHOLDER, DataError, image_files, load_records, sample_name, to_messages
from .tokens import Encoded, encode, first_special, render, token_ids, truncate


class LlavaDataset(torch.utils.data.Dataset):
    """A LLaVA-format file tokenized with ``processor`` (the format: :mod:`mdgd.data`).

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
        self._first = first_special(processor)
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
                f"(first: {sample_name(self.dropped[0], {})}); raise --max-length to keep them",
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
                raise DataError(f"{self.path}: {sample_name(index, rec)}: image not found: {path}")
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
                    f"{self.path}: {sample_name(index, rec)}: cannot read image {path} ({e})"
                ) from None
        return out

    def _messages(self, index: int, rec: dict) -> list[dict]:
        files = image_files(rec)
        count = sum(t["value"].count(PLACEHOLDER) for t in rec["conversations"])
        if count != len(files):
            raise DataError(
                f"{self.path}: {sample_name(index, rec)}: {count} {PLACEHOLDER} placeholder(s) in "
                f"the conversation but {len(files)} image(s)"
            )
        return to_messages(rec["conversations"])

    def _named(self, index: int, rec: dict, build):
        try:
            return build()
        except DataError as e:
            raise DataError(f"{self.path}: {sample_name(index, rec)}: {e}") from None

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
        return truncate(enc, self.max_length, self.image_token_id) is not None

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
            enc = truncate(enc, self.max_length, self.image_token_id)
        if enc is None:  # the file changed under us
            raise DataError(
                f"{self.path}: {sample_name(rec['_index'], rec)} no longer fits max_length"
            )
        return enc

    def prompt(self, i: int) -> tuple[dict[str, torch.Tensor], str]:
        """The inputs of sample ``i``'s first prompt (with generation prompt), and its answer."""
        rec = self.records[i]
        messages = self._messages(rec["_index"], rec)
        a = next(k for k, m in enumerate(messages) if m["role"] == "assistant")
        answer = " ".join(p["text"] for p in messages[a]["content"] if p["type"] == "text")
        text = render(self.processor, messages[:a], generation_prompt=True)
        n = text.count(self.image_token)
        images = self._open(rec["_index"], rec, convert=True)[:n]
        inputs = self.processor(
            text=[text], images=images or None, add_special_tokens=self._first, return_tensors="pt"
        )
        return dict(inputs), answer
