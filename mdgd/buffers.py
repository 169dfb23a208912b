"""Flat gradient buffers whose views are the parameters' ``.grad``.

One :class:`FlatGrads` holds, for one list of parameters, a few named flat 1-D
buffers (``"g"`` and ``"h"``) in the parameters' dtype, allocated once. Each
buffer is cut into one view per parameter (same shape). Before a backward call
:meth:`FlatGrads.point` assigns ``p.grad = view`` for every parameter: autograd
then accumulates into the existing ``.grad`` in place (``grad += new``), i.e.
straight into the flat buffer, with no copy and no concatenation. The buffers
are exactly what the fused op reads (``mdgd_kernels.mdgd_direction_``).

FSDP2 parameters (``DTensor`` with ``Shard(0)``) get buffers of this rank's
*local* shards only: each view is wrapped as a ``DTensor`` with the parameter's
mesh, placements, shape and stride, so that FSDP2's reduce-scatter accumulates
(``+=``) the sharded gradient straight into the buffer.

:func:`segment_layout` cuts the same flat space into the op's segments for a
granularity (``"tensor"``, ``"global"``, ``"block:K"``); it is built once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class FlatGrads:
    """Named flat gradient buffers for ``params`` and their per-parameter views."""

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[nn.Parameter],
        kinds: Sequence[str],
        shapes: Sequence[torch.Size] | None = None,
    ) -> None:
        if not params:
            raise ValueError("FlatGrads needs at least one parameter")
        dtypes = {p.dtype for p in params}
        devices = {p.device for p in params}
        if len(dtypes) > 1 or len(devices) > 1:
            by = {(p.dtype, p.device): n for n, p in zip(names, params)}
            raise ValueError(
                "all trainable parameters must share one dtype and device (one flat buffer "
                f"per gradient); found {sorted(str(k) for k in by)}, e.g. "
                + ", ".join(f"{n}: {k[0]} on {k[1]}" for k, n in by.items())
            )
        self.names = list(names)
        self.params = list(params)
        self.dtype = params[0].dtype
        self.device = params[0].device
        # a strategy may keep only part of each parameter here (DeepSpeed ZeRO-3: this
        # rank's partition, read through DeepSpeed's API, never pointed at as .grad)
        self.local_shapes = (
            list(shapes) if shapes is not None else [local_tensor(p).shape for p in params]
        )
        self.sizes = [math.prod(s) for s in self.local_shapes]
        self.numel = sum(self.sizes)
        self.buffers: dict[str, torch.Tensor] = {}
        self.views: dict[str, list[torch.Tensor]] = {}
        for kind in kinds:
            buf = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
            self.buffers[kind] = buf
            self.views[kind] = [
                _as_grad(v.view(shape), p) if shapes is None else v.view(shape)
                for v, shape, p in zip(torch.split(buf, self.sizes), self.local_shapes, params)
            ]

    def point(self, kind: str) -> None:
        """``p.grad = view`` of buffer ``kind`` for every parameter (the next backward adds)."""
        for p, v in zip(self.params, self.views[kind]):
            p.grad = v

    def detach_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def zero_(self) -> None:
        for buf in self.buffers.values():
            buf.zero_()

    def local_views(self, kind: str) -> list[torch.Tensor]:
        """The per-parameter views of buffer ``kind`` as plain tensors (local shards)."""
        return [local_tensor(v) for v in self.views[kind]]


def is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (FSDP2 parameter or gradient); ``t`` otherwise."""
    return t.to_local() if is_dtensor(t) else t


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of this rank's part of ``tensors``: a ``DTensor``'s local shard (FSDP2's
    ``Shard(0)``, unpadded: rank r of W holds ``ceil(d0 / W)`` rows, the last ones fewer),
    any other tensor whole."""
    return sum(local_tensor(t).numel() * t.element_size() for t in tensors)


def held_bytes(engine: Any, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """This rank's bytes of what a training step keeps allocated throughout: the parameters
    of both models (``params``; one they share, e.g. a lean phi's frozen module from
    :func:`mdgd.reference_model`, once), the engine's flat gradient buffers
    (``grad_buffers``: g and h of theta and of phi) and ``optimizer``'s state tensors
    (``optimizer``: AdamW's moments and step counters, SGD's momentum); local shards under
    FSDP2, everything under ``"dp"``. Not for DeepSpeed engines: ZeRO keeps its partitions
    and master weights apart (the step benchmark reads them itself)."""
    grads = [b for fg in (engine.theta, engine.phi) if fg is not None for b in fg.buffers.values()]
    states = optimizer.state.values() if optimizer is not None else []
    state = [v for st in states for v in st.values() if torch.is_tensor(v)]
    models = [m for m in (engine.model, engine.ref_model) if m is not None]
    params = {id(p): p for m in models for p in m.parameters()}  # shared ones once
    return {
        "params": local_bytes(params.values()),
        "grad_buffers": local_bytes(grads),
        "optimizer": local_bytes(state),
    }


def _as_grad(view: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``view`` as a gradient of ``p``: a DTensor laid out like ``p`` when ``p`` is one."""
    if not is_dtensor(p):
        return view
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        view, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


@dataclass(frozen=True)
class Segments:
    """The op's segmentation of a flat buffer, with a name and an owner per segment."""

    sizes: list[int]
    names: list[str]
    param_index: list[int]  # owning parameter of every segment (-1: several, for "global")


def segment_layout(
    names: Sequence[str], sizes: Sequence[int], block: int | None, granularity: str
) -> Segments:
    """Segments for ``granularity``: one per tensor, one for all, or blocks of ``block``."""
    if granularity == "tensor":
        return Segments(list(sizes), list(names), list(range(len(sizes))))
    if granularity == "global":
        return Segments([sum(sizes)], [f"all {len(sizes)} trainable parameters"], [-1])
    seg_sizes, seg_names, owner = [], [], []
    for i, (name, n) in enumerate(zip(names, sizes)):
        full, rest = divmod(n, block)
        parts = [block] * full + ([rest] if rest else [])
        for b, s in enumerate(parts):
            seg_sizes.append(s)
            seg_names.append(f"{name}[block {b} of {len(parts)}]")
            owner.append(i)
    return Segments(seg_sizes, seg_names, owner)
