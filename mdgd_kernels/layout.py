"""Segment layouts and the chunk table shared by every backend.

A layout cuts a flat buffer of ``N = sum(sizes)`` elements into ``S`` segments.
Kernels do not see the sizes: they see a *chunk table*, ``chunks[C, 3]`` (int64:
segment id, first element, length), where every chunk lies inside one segment
and holds at most ``CHUNK`` elements, and ``chunk_ptr[S + 1]`` (int64), so that
segment ``s`` owns chunks ``chunk_ptr[s]:chunk_ptr[s + 1]`` in element order.
One program (GPU) or one task (CPU) reduces one chunk into a partial; partials
are summed per segment in chunk order, which makes the statistics deterministic
(apex's multi-tensor-apply chunking, without float atomics).

The table is built once per ``(sizes, device)`` and cached: building it is a host
computation plus one host-to-device copy, which must never happen per step.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

CHUNK = 65536
"""Elements per chunk. 64K elements keep ~3,000 programs in flight for one
LLaVA-7B decoder layer (202M elements) and one partial row per 64K elements."""


@dataclass(frozen=True, eq=False)
class SegmentLayout:
    sizes: tuple[int, ...]
    numel: int
    device: torch.device
    chunks: torch.Tensor  # int64 [C, 3]: segment, start, length
    chunk_ptr: torch.Tensor  # int64 [S + 1]
    sizes_t: torch.Tensor  # int64 [S], on the device (top-alpha weights)
    offsets: tuple[int, ...]  # host copy of the segment starts, for messages

    @property
    def num_segments(self) -> int:
        return len(self.sizes)

    @property
    def num_chunks(self) -> int:
        return int(self.chunks.shape[0])

    def segment_range(self, s: int) -> tuple[int, int]:
        return self.offsets[s], self.offsets[s] + self.sizes[s]


def _build_tables(sizes: tuple[int, ...], chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = torch.tensor(sizes, dtype=torch.int64)
    offsets = torch.cumsum(n, 0) - n
    counts = (n + chunk - 1) // chunk
    chunk_ptr = torch.zeros(len(sizes) + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=chunk_ptr[1:])
    seg = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int64), counts)
    j = torch.arange(seg.numel(), dtype=torch.int64) - chunk_ptr[seg]
    start = offsets[seg] + j * chunk
    length = torch.minimum(torch.full_like(start, chunk), offsets[seg] + n[seg] - start)
    return torch.stack([seg, start, length], dim=1).contiguous(), chunk_ptr


@functools.lru_cache(maxsize=128)
def _cached(sizes: tuple[int, ...], device: torch.device, chunk: int) -> SegmentLayout:
    chunks, chunk_ptr = _build_tables(sizes, chunk)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    return SegmentLayout(
        sizes=sizes,
        numel=offsets[-1],
        device=device,
        chunks=chunks.to(device),
        chunk_ptr=chunk_ptr.to(device),
        sizes_t=torch.tensor(sizes, dtype=torch.int64, device=device),
        offsets=tuple(offsets[:-1]),
    )


def _not_compiled(fn):
    """``torch.compiler.disable(fn)``, applied at the first call.

    Decorating at import time would import ``torch._dynamo``, which imports
    triton: ``import mdgd_kernels`` must stay lean (no triton, no CUDA).
    """
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if disabled is None:
            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper


def get_layout(
    sizes: Sequence[int] | SegmentLayout, device: torch.device | str, chunk: int = CHUNK
) -> SegmentLayout:
    """The cached layout of ``sizes`` on ``device`` (a layout passes through).

    A layout passes through untouched, which ``torch.compile`` traces; building
    one from ``sizes`` is a host-side cache look-up that it does not, so compiled
    code with ``fullgraph=True`` must be given a prebuilt layout.
    """
    if isinstance(sizes, SegmentLayout):
        return sizes
    return _layout_of(sizes, device, chunk)


@_not_compiled  # host-side cache; pass a prebuilt layout into compiled code
def _layout_of(sizes: Sequence[int], device: torch.device | str, chunk: int) -> SegmentLayout:
    key = tuple(int(s) for s in sizes)
    if not key:
        raise ValueError("sizes is empty: give at least one segment size")
    if min(key) < 0:
        raise ValueError(
            f"sizes must be non-negative, got {min(key)} at index {key.index(min(key))}"
        )
    return _cached(key, canonical_device(device), chunk)


def canonical_device(device: torch.device | str) -> torch.device:
    """``device`` with its index. ``"cuda"`` means the current GPU, whose tensors report
    ``cuda:0`` (say): a layout keyed and compared by the unindexed name would never match
    its buffers."""
    device = torch.device(device)
    if device.index is None and device.type != "cpu":
        current = getattr(getattr(torch, device.type, None), "current_device", None)
        if current is not None:
            return torch.device(device.type, current())
    return device
