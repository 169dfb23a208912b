"""LLaVA's ``group_by_modality_length`` order: optimizer steps of one modality each.

Under FSDP2 and DeepSpeed ZeRO the ranks' micro-batches of one micro-step must all
have images or all be text-only (a text-only one skips the vision tower's
collectives, :func:`mdgd.distributed.common.check_same_modality`). With

    M = B * W * GAS     (per-device batch, ranks, accumulation steps: one optimizer step)

the DataLoader cuts the order into batches of ``B``, accelerate hands batch ``k``
to rank ``k % W`` (``BatchSamplerShard``, ``split_batches=False``) and every rank
accumulates ``GAS`` of its batches per step, so optimizer step ``s`` consumes
exactly ``order[s*M:(s+1)*M]`` and micro-step ``j`` (the ``W`` ranks' ``j``-th
batches) exactly ``order[j*W*B:(j+1)*W*B]``. The order is therefore built in blocks
of ``M``:

1. the samples with an image and the text-only ones are permuted separately and
   each group is cut into megabatches of ``M``; what is left of each group
   (fewer than ``M``) is its tail;
2. each full megabatch is sorted by length, longest first, and dealt greedily into
   its ``W * GAS`` batches of ``B`` (each sample to the batch of smallest total
   length that still has room), so the ranks get about the same number of tokens;
3. the full megabatches of both groups are shuffled together;
4. the two tails come last, images first. With ``W > 1`` each tail is padded to
   whole micro-steps (a multiple of ``W * B`` samples) with repeats of its group's
   first samples in the epoch's permutation (cycling through the group when it is
   smaller than the padding), then its images (longest first) and its text-only
   samples (longest first) are each dealt into full batches of their own. With
   ``W = 1`` nothing is repeated: the images (longest first) are dealt into the
   first ``min(images, batches)`` of the tail's batches, one each to begin with,
   then the text-only samples fill those and the batches after them.

Repeats (``W > 1``): a group of ``n`` samples gets ``(-n) mod (W * B)`` of them,
fewer than ``W * B`` per modality and epoch; ``len(sampler)`` counts them. They
take the place of the ones accelerate would add (``even_batches`` completes an
incomplete last round of ``W`` batches with the epoch's first samples, of either
modality): the order's length is a multiple of ``W * B``, so accelerate adds none.

Guarantees. With ``W > 1`` every micro-step of the epoch, tail included, has the
``W`` ranks' batches all with images or all text-only, and every optimizer step is
single-modality but at most one, one of the last two: the one where the tail's
images end and its text-only samples begin, unless that is a step boundary. With
``W = 1`` every optimizer step is single-modality but the last one, or the last two
when the two tails together hold more than ``M`` samples (a step of ``M`` samples
taken from two groups of fewer than ``M`` each cannot be single-modality).

Lengths follow LLaVA's ``modality_lengths``: the sample's length when it has an
image, minus its length when it is text-only. Zero is neither, so it is an error.
The order depends only on ``seed + epoch`` (:meth:`set_epoch`; the Trainer calls
it through accelerate's DataLoader every epoch, and
:meth:`mdgd.integrations.hf.MDGDTrainer.get_resumed_dataloader` keeps it reachable
when resuming mid-epoch), so every rank computes the same order and takes its own
batches from it.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

IMAGE = "image"
TEXT = "text"


class ModalityLengthGroupedSampler(Sampler[int]):
    """All indices of ``lengths`` in LLaVA's modality-grouped order (see the module),
    with ``world_size > 1`` plus :attr:`repeats` repeated ones.

    Args:
        lengths: per sample, its length if it has an image, minus its length if it
            is text-only (LLaVA's ``modality_lengths``; a list, array or tensor of
            nonzero ints).
        batch_size: the per-device batch size ``B``.
        world_size: the number of ranks ``W`` the DataLoader is sharded over.
        gradient_accumulation_steps: micro-batches per optimizer step ``GAS``.
        seed: with the epoch, seeds the order; the same on every rank.

    Attributes:
        repeats: how many samples with an image and how many text-only ones each
            epoch repeats (the module's step 4), each fewer than ``B * W``.
    """

    def __init__(
        self,
        lengths: Sequence[int] | Any,
        batch_size: int,
        world_size: int = 1,
        gradient_accumulation_steps: int = 1,
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("world_size", world_size),
            ("gradient_accumulation_steps", gradient_accumulation_steps),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.lengths = checked_lengths(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.megabatch_size = batch_size * world_size * gradient_accumulation_steps
        images = sum(n > 0 for n in self.lengths)
        texts = len(self.lengths) - images
        self.repeats = (
            repeat_count(images, batch_size, world_size),
            repeat_count(texts, batch_size, world_size),
        )
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` from now on."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) + sum(self.repeats)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def order(self) -> list[int]:
        """This epoch's order (what iterating yields)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return grouped_order(
            self.lengths, self.batch_size, self.world_size, self.megabatch_size, generator
        )


def checked_lengths(lengths: Sequence[int] | Any) -> list[int]:
    """``lengths`` as a list of ints; ValueError unless 1-D, non-empty, integer, nonzero."""
    values = torch.as_tensor(lengths)
    dtype = values.dtype
    if values.dim() != 1:
        raise ValueError(
            f"lengths must be 1-D (one length per sample), got shape {tuple(values.shape)}"
        )
    if values.numel() == 0:
        raise ValueError("lengths is empty: the sampler needs one length per sample")
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"lengths must be ints, got {dtype}")
    zeros = (values == 0).nonzero()
    if len(zeros):
        raise ValueError(
            f"lengths[{int(zeros[0])}] is 0: a length is positive for a sample with an image "
            "and negative for a text-only one (LLaVA's modality_lengths)"
        )
    return values.tolist()


def grouped_order(
    lengths: list[int],
    batch_size: int,
    world_size: int,
    megabatch_size: int,
    generator: torch.Generator,
) -> list[int]:
    """The modality-grouped order of the module's steps 1-4 (``lengths`` checked)."""
    sizes = [abs(n) for n in lengths]

    def longest_first(indices: list[int]) -> list[int]:
        return sorted(indices, key=lambda i: -sizes[i])  # stable: ties keep the shuffled order

    full: list[list[int]] = []
    tails: list[list[int]] = []
    for has_image in (True, False):
        group = [i for i, n in enumerate(lengths) if (n > 0) == has_image]
        shuffled = [group[j] for j in _permute(len(group), generator)]
        cut = len(shuffled) - len(shuffled) % megabatch_size
        full += [shuffled[i : i + megabatch_size] for i in range(0, cut, megabatch_size)]
        repeats = repeat_count(len(shuffled), batch_size, world_size)
        tail = shuffled[cut:] + [shuffled[j % len(shuffled)] for j in range(repeats)]
        tails.append(longest_first(tail))
    order = []
    for j in _permute(len(full), generator):
        order += balanced_batches(longest_first(full[j]), sizes, batch_size)
    images, texts = tails
    if world_size > 1:  # whole micro-steps of each modality
        order += balanced_batches(images, sizes, batch_size)
        return order + balanced_batches(texts, sizes, batch_size)
    count = -(-(len(images) + len(texts)) // batch_size)
    shared = min(len(images), count) * batch_size - len(images)  # texts in the image batches
    order += balanced_batches(images + texts[:shared], sizes, batch_size)
    return order + balanced_batches(texts[shared:], sizes, batch_size)


def repeat_count(samples: int, batch_size: int, world_size: int) -> int:
    """How many of a modality's ``samples`` an epoch repeats: none with one rank, else
    what completes its last micro-step of ``world_size * batch_size`` samples."""
    return 0 if world_size == 1 else -samples % (world_size * batch_size)


def balanced_batches(indices: list[int], sizes: list[int], batch_size: int) -> list[int]:
    """``indices`` dealt in their order into ``ceil(n / batch_size)`` batches (all full
    but the last), each to the batch of smallest total size that still has room (ties:
    the earlier batch), and laid out batch after batch.

    Sizes are positive, so the first ``ceil(n / batch_size)`` indices open one batch each.
    """
    if not indices:
        return []
    count = -(-len(indices) // batch_size)
    room = [batch_size] * count
    room[-1] = len(indices) - (count - 1) * batch_size
    batches: list[list[int]] = [[] for _ in range(count)]
    heap = [(0, b) for b in range(count)]  # (total size, batch); sorted, so a heap
    for i in indices:
        total, b = heapq.heappop(heap)
        batches[b].append(i)
        if len(batches[b]) < room[b]:
            heapq.heappush(heap, (total + sizes[i], b))
    return [i for batch in batches for i in batch]


def step_modalities(
    order: Sequence[int],
    lengths: Sequence[int],
    batch_size: int,
    world_size: int = 1,
    gradient_accumulation_steps: int = 1,
) -> list[frozenset[str]]:
    """Per optimizer step, the modalities (:data:`IMAGE`, :data:`TEXT`) of the samples it
    trains on over all ranks and micro-batches, when ``order`` is cut into batches of
    ``batch_size``, dealt to ``world_size`` ranks in turn and accumulated
    ``gradient_accumulation_steps`` per step (step ``s`` is ``order[s*M:(s+1)*M]``)."""
    step = batch_size * world_size * gradient_accumulation_steps
    return [
        frozenset(IMAGE if lengths[i] > 0 else TEXT for i in order[s : s + step])
        for s in range(0, len(order), step)
    ]


def _permute(n: int, generator: torch.Generator) -> list[int]:
    """A random permutation of ``range(n)`` (a seam the tests replace)."""
    return torch.randperm(n, generator=generator).tolist()
