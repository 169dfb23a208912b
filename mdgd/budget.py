"""MDGD-GM's budget under ``granularity="block:K"``: only the selected blocks change.

The mask selects blocks, but the optimizer steps whole tensors: a parameter with
one selected block keeps its ``.grad`` (zero in its other blocks), and AdamW's
momentum and weight decay then move the zero-gradient blocks too (on the
tests' tiny LLaVA with ``alpha=0.1`` and ``K=64``, 72-86% of the elements moved
per AdamW step, against 10% selected). With
``MDGDConfig(freeze_unselected=True)`` (the default) :class:`FreezeUnselected`
hooks the optimizer: before its step it copies the partly selected parameters
and their same-shaped state tensors (moments, momentum buffers); after the step
it writes the unselected blocks back, so exactly the selected elements change,
parameters and moments alike. A state tensor the step creates gets zeros there
(what a zero gradient gives AdamW and SGD). Per-tensor scalars (AdamW's
``step``) still advance for a partly selected parameter.

Parameters with no selected block have ``grad = None`` and are untouched anyway.
Under FSDP2 each rank restores its own shards (the parameters, moments and mask
rows it holds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .buffers import local_tensor


class FreezeUnselected:
    """Keeps the unselected blocks of partly selected parameters through an optimizer step."""

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        owner: Sequence[int],
        sizes: Sequence[int],
        device: torch.device,
        local_ranges: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.params = list(params)
        self.local_ranges = local_ranges  # FSDP2: this rank's flat [lo, hi) of each parameter
        self.segments = [0] * len(self.params)  # segments per parameter
        for o in owner:
            self.segments[o] += 1
        self.first = [0] * len(self.params)  # index of each parameter's first segment
        for j in range(1, len(self.params)):
            self.first[j] = self.first[j - 1] + self.segments[j - 1]
        self.sizes = torch.tensor(list(sizes), dtype=torch.int64, device=device)
        self._partial: list[tuple[nn.Parameter, torch.Tensor]] = []
        self._saved: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self._hooked: set[int] = set()

    @classmethod
    def for_engine(cls, engine: Any) -> FreezeUnselected | None:
        """The engine's freezer: ``gm`` with ``"block:K"`` and ``freeze_unselected``."""
        cfg = engine.config
        wanted = cfg.mode == "gm" and cfg.block_size is not None and cfg.freeze_unselected
        if not wanted:
            return None
        segs = engine.segments
        ranges = engine.exchange.local_ranges
        return cls(engine.theta.params, segs.param_index, segs.sizes, engine.device, ranges)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Run around every ``optimizer.step()`` (idempotent)."""
        if id(optimizer) in self._hooked:
            return
        self._hooked.add(id(optimizer))
        optimizer.register_step_pre_hook(self._before)
        optimizer.register_step_post_hook(self._after)

    def select(self, mask: torch.Tensor, hits: Sequence[float], skipped: bool) -> None:
        """After the op: ``mask`` [S] (device), ``hits`` selected segments per parameter."""
        self._partial = []
        if skipped:
            return
        for j, (p, h) in enumerate(zip(self.params, hits)):
            if 0 < h < self.segments[j]:
                lo, hi = self.first[j], self.first[j] + self.segments[j]
                keep = torch.repeat_interleave(
                    mask[lo:hi], self.sizes[lo:hi], output_size=p.numel()
                )
                if self.local_ranges is not None:
                    a, b = self.local_ranges[j]
                    keep = keep[a:b]
                self._partial.append((p, keep.view(local_tensor(p).shape)))

    def _before(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        self._saved = [
            (local_tensor(p.detach()).clone(), {k: v.clone() for k, v in _moments(optimizer, p)})
            for p, _ in self._partial
        ]

    @torch.no_grad()
    def _after(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        for (p, keep), (old, moments) in zip(self._partial, self._saved):
            mine = local_tensor(p)
            mine.copy_(torch.where(keep, mine, old))
            for k, v in _moments(optimizer, p):
                before = moments.get(k)
                v.copy_(torch.where(keep, v, before if before is not None else 0))
        self._partial, self._saved = [], []


def _moments(optimizer: torch.optim.Optimizer, p: nn.Parameter):
    """The state tensors of ``p`` shaped like ``p`` (moments, momentum buffers), this
    rank's shards of them under FSDP2."""
    return [
        (k, local_tensor(v))
        for k, v in optimizer.state.get(p, {}).items()
        if isinstance(v, torch.Tensor) and v.shape == p.shape
    ]


def updated_fraction(
    mode: str,
    selected_fraction: torch.Tensor,
    hits: torch.Tensor,
    param_sizes: torch.Tensor,
    frozen: bool,
) -> torch.Tensor:
    """Fraction of the trainable elements the optimizer may change this step (device).

    Outside ``gm`` every element; in ``gm`` the selected elements when whole
    parameters are selected or the unselected blocks are frozen, else every
    element of every parameter with a selected segment (weight decay and momentum
    move the rest of such a tensor).
    """
    if mode != "gm" or frozen:
        return selected_fraction
    sizes = param_sizes.to(hits.device, torch.float64)
    return (sizes * (hits > 0)).sum() / sizes.sum()
