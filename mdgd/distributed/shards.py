"""Strategies whose ranks hold shards of the gradients: the op on local buffers.

The statistics are sums over elements, so each rank runs pass 1 on its local
buffers with a *local* segment layout (each segment's pieces inside this
rank's shards), adds the pieces into the global ``[S, 10]`` table, and one
``all_reduce`` carries that table together with the loss sums and the
micro-batch count. Every rank derives the same coefficients and MDGD-GM mask
from it, and pass 2 writes the direction into the local shards. The wrapper's
own reduction (FSDP2's reduce-scatter, ZeRO's) has already averaged over the
ranks, so the direction is scaled by ``1 / micro-batches`` only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

import mdgd_kernels
from mdgd_kernels.coeffs import coefficients

from .common import Collectives
from .exchange import GradExchange


class ShardedExchange(GradExchange):
    """Buffers of this rank's part of every trainable parameter (module doc).

    A subclass sets ``self.comm`` (its :class:`Collectives`) and calls
    :meth:`set_local_ranges` once its buffers exist.
    """

    comm: Collectives

    def set_local_ranges(self, ranges: Sequence[tuple[int, int]]) -> None:
        """This rank's ``[lo, hi)`` of each parameter's flat elements (in ``names`` order)."""
        self.local_ranges = list(ranges)
        seg, _, length = local_pieces(self.segments.sizes, self.numels, self.local_ranges)
        self.seg_of_piece = torch.tensor(seg, dtype=torch.int64, device=self.device)
        self.local_layout = mdgd_kernels.get_layout(length, self.device) if length else None

    def scale(self, n: int) -> float:
        return 1.0 / n  # the wrapper's reduction already averaged over the ranks

    def direction(
        self, loss_sums: torch.Tensor, n: int
    ) -> tuple[mdgd_kernels.MDGDResult | None, torch.Tensor]:
        cfg = self.config
        small = self.reduce(loss_sums, n)
        mdgd = cfg.mode != "ft"
        rows = self.layout.num_segments if mdgd else 0
        stats = torch.zeros(rows, 10, dtype=torch.float32, device=self.device)
        bufs = [self.theta.buffers["g"]]
        if mdgd:
            bufs += [self.theta.buffers["h"], self.phi.buffers["g"], self.phi.buffers["h"]]
            if self.local_layout is not None:
                local = mdgd_kernels.segment_gram(*bufs, self.local_layout, backend=cfg.backend)
                stats.index_add_(0, self.seg_of_piece, local)
        packed = self.comm.all_reduce(
            torch.cat([stats.flatten(), small]), "all-reduce of the statistics and losses"
        )
        stats, totals = packed[: rows * 10].view(rows, 10), packed[rows * 10 :]
        scale = self.scale(n)
        if not mdgd:
            if scale != 1.0:
                bufs[0].mul_(scale)
            return None, totals
        coef = coefficients(
            stats,
            self.layout.sizes_t,
            **cfg.op_kwargs(),
            masked=self.masked,
            scale=scale,
        )
        if self.local_layout is not None:
            mdgd_kernels.segment_combine_(
                *bufs, self.local_layout, coef.coeffs[self.seg_of_piece], backend=cfg.backend
            )
        return mdgd_kernels.MDGDResult.of(coef, stats), totals


def local_pieces(
    sizes: Sequence[int], numels: Sequence[int], ranges: Sequence[tuple[int, int]]
) -> tuple[list[int], list[int], list[int]]:
    """The non-empty parts of the segments ``sizes`` that lie in this rank's shards.

    The parameters (``numels`` elements each) lie one after another in the flat
    space that ``sizes`` cuts; ``ranges[i]`` is this rank's ``[lo, hi)`` of
    parameter ``i``'s flat elements.
    Returns (segment index, start in the local buffer, length) lists, in local
    buffer order, covering the local buffer exactly. One sweep over segments and
    parameters together.
    """
    idx: list[int] = []
    start: list[int] = []
    length: list[int] = []
    seg_iter = _segment_spans(sizes)
    s, a, b = next(seg_iter, (0, 0, 0))
    param_start = local = 0
    for (lo, hi), numel in zip(ranges, numels):
        x, y = param_start + lo, param_start + hi
        while x < y:
            while b <= x:
                s, a, b = next(seg_iter)
            end = min(b, y)
            idx.append(s)
            start.append(local)
            length.append(end - x)
            local += end - x
            x = end
        param_start += numel
    return idx, start, length


def _segment_spans(sizes: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    a = 0
    for s, n in enumerate(sizes):
        yield s, a, a + n
        a += n
