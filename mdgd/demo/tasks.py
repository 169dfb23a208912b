"""Multimodal tasks made on the fly: real digits from scikit-learn and drawn scenes.

Images are ``size x size`` RGB in [-1, 1]. Three kinds of picture:

* ``digits``: a real handwritten digit (``sklearn.datasets.load_digits``, 1,797
  8x8 scans) scaled 2x, placed at a random offset on a dark canvas with a little noise.
  The 1,797 scans are split once (fixed permutation) into a training part and a
  held-out part, so the digit questions are evaluated on digits never trained on.
* ``scene``: one coloured shape (6 colours x 4 shapes) in one of four regions
  (left, right, top, bottom).
* ``count``: 1 to 4 small coloured shapes in distinct cells of a 4x4 grid.
* ``noisy digits`` (the target task's pictures): the same held-apart scans, drawn
  in a random colour over a background of random coloured blobs, a picture
  distribution the pre-trained model has never seen.

A :class:`Task` pairs a picture kind with a three-token question and the answer
words; :func:`make_split` draws ``n`` examples of it with a numpy ``Generator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .model import BOS_ID, COLOURS, DIGITS, IMAGE_ID, POSITIONS, SHAPES, TOKEN_ID, YES_NO, encode

RGB = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.9, 0.1),
    "blue": (0.15, 0.25, 1.0),
    "yellow": (1.0, 0.95, 0.1),
    "magenta": (1.0, 0.1, 1.0),
    "cyan": (0.1, 0.95, 1.0),
}
DIGIT_TRAIN_FRACTION = 0.75
DIGIT_JITTER = 2  # pixels either way from the centre
DIGIT_SCALE = 3  # 8x8 scans drawn as 24x24


@dataclass(frozen=True)
class Task:
    """One question type over one picture kind; answers are single vocabulary words."""

    name: str
    question: tuple[str, str, str]
    answers: tuple[str, ...]
    draw: Callable[[np.random.Generator, int, int, str], tuple[np.ndarray, np.ndarray]]

    @property
    def answer_ids(self) -> list[int]:
        return encode(list(self.answers))


@dataclass
class Split:
    """Tensors of ``n`` examples of one task, ready for ``LlavaForConditionalGeneration``."""

    task: str
    input_ids: torch.Tensor  # [n, L] long
    pixel_values: torch.Tensor  # [n, 3, S, S] float32
    labels: torch.Tensor  # [n, L] long, -100 except at the answer position
    answer: torch.Tensor  # [n] index into the task's answers

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = self.input_ids[idx]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": self.pixel_values[idx],
            "labels": self.labels[idx],
        }


# ---------------------------------------------------------------- drawing helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _shape_mask(shape: str, cy: float, cx: float, r: float, size: int) -> np.ndarray:
    y, x = _grid(size)
    dy, dx = y - cy, x - cx
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "triangle":
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) * 0.5)
    if shape == "cross":
        t = max(r / 3.0, 1.0)
        return ((np.abs(dx) <= t) & (np.abs(dy) <= r)) | ((np.abs(dy) <= t) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _paint(img: np.ndarray, mask: np.ndarray, colour: str, rng: np.random.Generator) -> None:
    rgb = np.asarray(RGB[colour], dtype=np.float32) * rng.uniform(0.8, 1.0)
    img[:, mask] = rgb[:, None]


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float = 0.03) -> np.ndarray:
    img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0) * 2.0 - 1.0


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = np.random.default_rng(12345).permutation(len(d.target))  # fixed, seed-independent
    return (d.images[perm] / 16.0).astype(np.float32), d.target[perm].astype(np.int64)


def digit_pool(part: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``train`` or ``eval`` part of the scikit-learn digits (disjoint, fixed)."""
    images, labels = _digits()
    cut = int(DIGIT_TRAIN_FRACTION * len(labels))
    return (images[:cut], labels[:cut]) if part == "train" else (images[cut:], labels[cut:])


def _place_digit(img: np.ndarray, digit: np.ndarray, rgb: np.ndarray, rng) -> None:
    size = img.shape[-1]
    big = np.kron(digit, np.ones((DIGIT_SCALE, DIGIT_SCALE), dtype=np.float32))
    centre = (size - big.shape[0]) // 2
    oy, ox = centre + rng.integers(-DIGIT_JITTER, DIGIT_JITTER + 1, size=2)
    region = img[:, oy : oy + big.shape[0], ox : ox + big.shape[1]]
    alpha = big[None]
    region[:] = region * (1.0 - alpha) + rgb[:, None, None] * alpha


# ---------------------------------------------------------------- picture kinds


def draw_digits(rng, n: int, size: int, part: str):
    images, labels = digit_pool(part)
    pick = rng.integers(0, len(labels), size=n)
    out = np.zeros((n, 3, size, size), dtype=np.float32)
    white = np.ones(3, dtype=np.float32)
    for i, j in enumerate(pick):
        _place_digit(out[i], images[j], white * rng.uniform(0.8, 1.0), rng)
        out[i] = _finish(out[i], rng)
    return out, labels[pick]


def draw_noisy_digits(rng, n: int, size: int, part: str):
    """Digits in a random colour over coloured blobs: the target task's pictures."""
    images, labels = digit_pool(part)
    pick = rng.integers(0, len(labels), size=n)
    out = np.zeros((n, 3, size, size), dtype=np.float32)
    for i, j in enumerate(pick):
        out[i] = rng.uniform(0.0, 0.35, size=(3, 1, 1))
        for _ in range(rng.integers(2, 5)):
            mask = _shape_mask(
                SHAPES[rng.integers(len(SHAPES))], *rng.uniform(0, size, 2), rng.uniform(3, 7), size
            )
            out[i][:, mask] = rng.uniform(0.0, 0.6, size=(3, 1))
        rgb = np.asarray(RGB[COLOURS[rng.integers(len(COLOURS))]], dtype=np.float32)
        _place_digit(out[i], images[j], rgb, rng)
        out[i] = _finish(out[i], rng, noise=0.06)
    return out, labels[pick]


def _scene(rng, n: int, size: int):
    """One shape: returns pictures and (colour, shape, position) indices."""
    out = np.zeros((n, 3, size, size), dtype=np.float32)
    attrs = np.stack(
        [rng.integers(0, len(COLOURS), n), rng.integers(0, len(SHAPES), n), rng.integers(0, 4, n)],
        axis=1,
    )
    s = size / 32.0
    for i, (c, sh, p) in enumerate(attrs):
        r = rng.uniform(5.0, 7.0) * s
        along = rng.uniform(12.5, 19.5) * s
        edge = rng.uniform(7.5, 9.5) * s
        cy, cx = {
            0: (along, edge),  # left
            1: (along, size - 1 - edge),  # right
            2: (edge, along),  # top
            3: (size - 1 - edge, along),  # bottom
        }[int(p)]
        _paint(out[i], _shape_mask(SHAPES[sh], cy, cx, r, size), COLOURS[c], rng)
        out[i] = _finish(out[i], rng)
    return out, attrs


def draw_colour(rng, n, size, part):
    images, attrs = _scene(rng, n, size)
    return images, attrs[:, 0]


def draw_shape(rng, n: int, size: int, part: str):
    """One large shape near the centre (the shape question needs its outline)."""
    out = np.zeros((n, 3, size, size), dtype=np.float32)
    shapes = rng.integers(0, len(SHAPES), n)
    s = size / 32.0
    for i, sh in enumerate(shapes):
        cy, cx = size / 2 - 0.5 + rng.uniform(-3.0, 3.0, 2) * s
        mask = _shape_mask(SHAPES[sh], cy, cx, rng.uniform(8.0, 11.0) * s, size)
        _paint(out[i], mask, COLOURS[rng.integers(len(COLOURS))], rng)
        out[i] = _finish(out[i], rng)
    return out, shapes


def draw_position(rng, n, size, part):
    images, attrs = _scene(rng, n, size)
    return images, attrs[:, 2]


def _objects(rng, n: int, size: int):
    """1 to 4 small shapes in distinct cells of a 4x4 grid: pictures, counts, shape kinds."""
    out = np.zeros((n, 3, size, size), dtype=np.float32)
    counts = rng.integers(1, 5, size=n)
    kinds = []
    cell = size / 4.0
    for i, k in enumerate(counts):
        kinds.append(set())
        for c in rng.choice(16, size=k, replace=False):
            cy = (c // 4 + 0.5) * cell + rng.uniform(-0.8, 0.8)
            cx = (c % 4 + 0.5) * cell + rng.uniform(-0.8, 0.8)
            sh = int(rng.integers(len(SHAPES)))
            kinds[-1].add(sh)
            _paint(
                out[i],
                _shape_mask(SHAPES[sh], cy, cx, cell * 0.38, size),
                COLOURS[rng.integers(len(COLOURS))],
                rng,
            )
        out[i] = _finish(out[i], rng)
    return out, counts, kinds


def draw_count(rng, n: int, size: int, part: str):
    images, counts, _ = _objects(rng, n, size)
    return images, counts - 1  # index into answers "1".."4"


def draw_any_circle(rng, n: int, size: int, part: str):
    images, _, kinds = _objects(rng, n, size)
    circle = SHAPES.index("circle")
    return images, np.array([0 if circle in k else 1 for k in kinds])  # 0 -> "yes"


def draw_parity(rng, n, size, part):
    images, labels = draw_noisy_digits(rng, n, size, part)
    return images, (labels % 2 == 0).astype(np.int64)  # 0 -> "yes" (odd), 1 -> "no"


PRETRAINED_TASKS: tuple[Task, ...] = (
    Task("digit", ("what", "digit", "?"), tuple(DIGITS), draw_digits),
    Task("colour", ("what", "colour", "?"), tuple(COLOURS), draw_colour),
    Task("shape", ("what", "shape", "?"), tuple(SHAPES), draw_shape),
    Task("count", ("how", "many", "?"), ("1", "2", "3", "4"), draw_count),
    Task("position", ("where", "is", "?"), tuple(POSITIONS), draw_position),
    Task("any-circle", ("any", "circle", "?"), tuple(YES_NO), draw_any_circle),
)
TARGET_TASK = Task("odd-digit", ("is", "odd", "?"), tuple(YES_NO), draw_parity)
ALL_TASKS = {t.name: t for t in (*PRETRAINED_TASKS, TARGET_TASK)}


def make_split(
    task: Task, n: int, seed: int, part: str, image_size: int, num_image_tokens: int
) -> Split:
    """``n`` examples of ``task`` drawn with ``seed``; ``part`` is ``train`` or ``eval``.

    Train and eval use different random streams (and, for digits, disjoint scans),
    so no evaluation picture is ever trained on.
    """
    salt = sum(ord(ch) * 31**i for i, ch in enumerate(f"{task.name}/{part}")) % (2**31)
    rng = np.random.default_rng([seed, salt])
    images, answer = task.draw(rng, n, image_size, part)
    prompt = sequence(task, num_image_tokens)
    answer_ids = torch.tensor(task.answer_ids)[torch.from_numpy(answer)]
    input_ids = torch.tensor(prompt).repeat(n, 1)
    input_ids = torch.cat([input_ids, answer_ids[:, None]], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = answer_ids
    return Split(task.name, input_ids, torch.from_numpy(images), labels, torch.from_numpy(answer))


def sequence(task: Task, num_image_tokens: int) -> list[int]:
    """The prompt's token ids, without the answer."""
    return [BOS_ID] + [IMAGE_ID] * num_image_tokens + encode(list(task.question))


__all__ = [
    "ALL_TASKS",
    "PRETRAINED_TASKS",
    "TARGET_TASK",
    "TOKEN_ID",
    "Split",
    "Task",
    "make_split",
]
