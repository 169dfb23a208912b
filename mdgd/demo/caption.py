"""The caption target: a short generated description of a two-part scene.

A picture holds a group of 1-3 small shapes of one colour and kind on one side
and one large shape of another colour on the other side. Its caption names the
group, where it is relative to the large shape, and the large shape, in six
words of the demo's vocabulary:

    2 red circle left blue square      ("two red circles left of a blue square")

followed by ``<eos>``. Every word is one the pre-trained model already answers
with (a count, a colour, a shape, a position), but it never produced a
sentence: the target is trained with the language-model loss on all seven
tokens, and scored on greedy generation (:func:`caption_scores`) by exact match
and token F1 (the multiset overlap of the generated and the reference words,
as in SQuAD), both in [0, 1].

This module is kept apart from :mod:`.tasks`, whose source is part of the
phase-1 cache key: the caption target changes nothing in phase 1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .model import BOS_ID, COLOURS, EOS_ID, IMAGE_ID, POSITIONS, SHAPES, encode
from .tasks import Split, _finish, _paint, _shape_mask

NAME = "caption"
QUESTION = ("what", "is", "?")
COUNTS = ("1", "2", "3")
CAPTION_WORDS = 6
# grid cells (row, col) of a 4x4 grid on each side of the picture
_HALF = {
    "left": [(r, c) for r in range(4) for c in (0, 1)],
    "right": [(r, c) for r in range(4) for c in (2, 3)],
    "top": [(r, c) for r in (0, 1) for c in range(4)],
    "bottom": [(r, c) for r in (2, 3) for c in range(4)],
}
_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


@dataclass
class CaptionSplit(Split):
    """A :class:`~.tasks.Split` whose ``answer`` is ``[n, CAPTION_WORDS + 1]`` token ids
    (the caption and ``<eos>``), all labelled."""


def _centre_of(side: str, size: int) -> tuple[float, float]:
    q, h = size / 4.0, size / 2.0
    return {
        "left": (h, q),
        "right": (h, 3 * q),
        "top": (q, h),
        "bottom": (3 * q, h),
    }[side]


def draw_captions(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, list]:
    """``n`` pictures in [-1, 1] and their captions (lists of words)."""
    out = np.zeros((n, 3, size, size), dtype=np.float32)
    cell, s = size / 4.0, size / 32.0
    captions = []
    for i in range(n):
        side = POSITIONS[rng.integers(len(POSITIONS))]
        count = int(rng.integers(1, len(COUNTS) + 1))
        colour_a, colour_b = rng.choice(len(COLOURS), size=2, replace=False)
        shape_a, shape_b = rng.integers(len(SHAPES), size=2)
        cells = _HALF[side]
        for c in rng.choice(len(cells), size=count, replace=False):
            r, col = cells[c]
            cy = (r + 0.5) * cell + rng.uniform(-0.8, 0.8)
            cx = (col + 0.5) * cell + rng.uniform(-0.8, 0.8)
            mask = _shape_mask(SHAPES[shape_a], cy, cx, cell * 0.38, size)
            _paint(out[i], mask, COLOURS[colour_a], rng)
        cy, cx = np.asarray(_centre_of(_OPPOSITE[side], size)) - 0.5 + rng.uniform(-1, 1, 2) * s
        mask = _shape_mask(SHAPES[shape_b], cy, cx, rng.uniform(5.5, 6.5) * s, size)
        _paint(out[i], mask, COLOURS[colour_b], rng)
        out[i] = _finish(out[i], rng)
        captions.append(
            [COUNTS[count - 1], COLOURS[colour_a], SHAPES[shape_a], side]
            + [COLOURS[colour_b], SHAPES[shape_b]]
        )
    return out, captions


def prompt(num_image_tokens: int) -> list[int]:
    """The prompt's token ids, without the caption."""
    return [BOS_ID] + [IMAGE_ID] * num_image_tokens + encode(list(QUESTION))


def make_caption_split(
    n: int, seed: int, part: str, image_size: int, num_image_tokens: int
) -> CaptionSplit:
    """``n`` captioned pictures drawn with ``seed``; ``part`` (``train``/``eval``) picks the
    random stream, so no evaluation picture is trained on."""
    rng = np.random.default_rng([seed, sum(map(ord, f"{NAME}/{part}")), 7])
    images, captions = draw_captions(rng, n, image_size)
    answer = torch.tensor([encode(c) + [EOS_ID] for c in captions])
    input_ids = torch.cat([torch.tensor(prompt(num_image_tokens)).repeat(n, 1), answer], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -answer.shape[1] :] = answer
    return CaptionSplit(NAME, input_ids, torch.from_numpy(images), labels, answer)


def _words(ids: list[int]) -> list[int]:
    """The generated words: everything before the first ``<eos>``."""
    return ids[: ids.index(EOS_ID)] if EOS_ID in ids else ids


def token_f1(pred: list[int], ref: list[int]) -> float:
    """SQuAD-style F1 of the multiset overlap of two token lists."""
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def caption_scores(generated: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Exact match and mean token F1 of ``[n, T]`` generated ids against the reference ids
    (both cut at their first ``<eos>``)."""
    pairs = [(_words(g), _words(r)) for g, r in zip(generated.tolist(), reference.tolist())]
    exact = sum(g == r for g, r in pairs) / len(pairs)
    f1 = sum(token_f1(g, r) for g, r in pairs) / len(pairs)
    return exact, f1
