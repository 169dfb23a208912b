"""The demo's model: a small LLaVA built from a config, with a fixed word vocabulary.

No tokenizer, processor or weights are downloaded. Every prompt is a sequence of
whole words from :data:`VOCAB`:

    <bos> <image> x (image_size/patch_size)^2  w1 w2 ?  ANSWER

Every question has exactly three tokens (two words and ``?``), so every sequence
of a model has the same length and no padding is needed. The answer is a single
token, the only labelled position; accuracy reads the logits just before it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..testing import tiny_llava

SPECIAL = ["<pad>", "<bos>", "<eos>", "<image>", "?"]
QUESTION_WORDS = ["what", "digit", "colour", "shape", "how", "many", "where", "is", "odd", "any"]
DIGITS = [str(i) for i in range(10)]
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
SHAPES = ["square", "circle", "triangle", "cross"]
POSITIONS = ["left", "right", "top", "bottom"]
YES_NO = ["yes", "no"]

VOCAB: list[str] = SPECIAL + QUESTION_WORDS + DIGITS + COLOURS + SHAPES + POSITIONS + YES_NO
TOKEN_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = (TOKEN_ID[t] for t in ("<pad>", "<bos>", "<eos>", "<image>"))


def encode(words: list[str]) -> list[int]:
    """Token ids of a list of vocabulary words (KeyError names an unknown word)."""
    return [TOKEN_ID[w] for w in words]


@dataclass(frozen=True)
class ModelSize:
    """The knobs of the small LLaVA; everything else is fixed in :func:`_knobs`."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 4
    heads: int = 4

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def _knobs(size: ModelSize) -> dict:
    """The tiny-LLaVA builder's arguments for this size and the demo's vocabulary."""
    return {
        **size.to_dict(),
        "vocab_size": len(VOCAB),
        "max_position_embeddings": 64,
        "image_token_id": IMAGE_ID,
        "pad_id": PAD_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
    }


def build_model(size: ModelSize, seed: int) -> torch.nn.Module:
    """A randomly initialised ``LlavaForConditionalGeneration`` (deterministic in ``seed``):
    a CLIP vision tower and a Llama language model over :data:`VOCAB`."""
    return tiny_llava(seed, **_knobs(size))


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
