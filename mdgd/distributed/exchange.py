"""The gradient-exchange interface, and its one-process strategy.

A *gradient exchange* owns the four flat gradient buffers of an
:class:`~mdgd.MDGDEngine` and everything that depends on where the gradients
live: how a backward fills them, how the ranks combine them, and how the fused
op runs on them. One class per strategy, the same few methods, so the engine
has no branch on the distributed mode:

* :class:`LocalExchange` (``"none"``): one process;
* :class:`~mdgd.distributed.dp.DataParallelExchange` (``"dp"``): full buffers on
  every rank, all-reduced in buckets during the last backward;
* :class:`~mdgd.distributed.fsdp.FSDPExchange` (``"fsdp"``): FSDP2 models, buffers
  of this rank's local shards, filled by FSDP2's reduce-scatter.

What the engine calls, per micro-batch, around each of its backward calls into
buffer ``kind`` (``"g"``, then ``"h"``): :meth:`before_backward` and
:meth:`after_backward`. ``after_backward("h", last)`` is called even when the
``h`` backward does not run (no graph from ``L_v``), so that a strategy which
sends buffers at that point sends them on every rank. At the step,
:meth:`direction` reduces what is left, runs the op and returns its result and
the losses summed over the ranks; after a failed backward, :meth:`discard`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

import mdgd_kernels

from ..buffers import FlatGrads, Segments, is_dtensor, segment_layout
from ..config import MDGDConfig


class GradExchange:
    """Owns the buffers of ``theta`` and ``phi`` (see the module doc); one process here.

    Args:
        config: the engine's configuration.
        names: the trainable parameter names (theta's, in order).
        theta_params, phi_params: the trainable parameters of the two models, in
            ``names`` order (``phi_params`` None for ``mode="ft"``).
    """

    mode = "none"
    supports_scaler = True
    """False where a ``GradScaler``'s per-rank overflow check would see only a shard."""
    local_ranges: list[tuple[int, int]] | None = None
    """This rank's ``[lo, hi)`` of each trainable parameter's flat elements where a rank
    holds shards (FSDP2); None where every rank holds whole parameters."""

    def __init__(
        self,
        config: MDGDConfig,
        names: Sequence[str],
        theta_params: Sequence[nn.Parameter],
        phi_params: Sequence[nn.Parameter] | None,
    ) -> None:
        kinds = ("g",) if config.mode == "ft" else ("g", "h")
        self.config = config
        self.theta = FlatGrads(names, theta_params, kinds)
        self.phi = FlatGrads(names, phi_params, kinds) if phi_params is not None else None
        self.device = self.theta.device
        self.world = 1
        self.segments: Segments = segment_layout(
            names, [p.numel() for p in theta_params], config.block_size, config.granularity
        )
        # the layout of the whole trainable set; pass 1 and 2 run on it unless sharded
        self.layout = mdgd_kernels.get_layout(self.segments.sizes, self.device)
        # MDGD-GM drops whole parameters (grad = None) unless a parameter has several
        # segments ("block:K"): then pass 2 need not write zeros into dropped segments
        self.masked = "zero" if config.granularity.startswith("block") else "keep"

    @property
    def sides(self) -> list[FlatGrads]:
        return [fg for fg in (self.theta, self.phi) if fg is not None]

    # ------------------------------------------------------------------ per micro-batch

    def check_micro_batch(self, visual: Any, model: nn.Module, batch: Mapping[str, Any]) -> None:
        """Before a micro-batch's forward: raise where the ranks cannot run it together."""

    def before_backward(self, kind: str, last: bool) -> None:
        """Called before each backward into buffer ``kind`` (after its ``.grad`` are pointed);
        ``last``: the last micro-batch before the step."""

    def after_backward(self, kind: str, last: bool) -> None:
        """Called after each backward into ``kind`` (also when the ``h`` one did not run)."""

    @property
    def launched(self) -> bool:
        """True once the last micro-batch's reduction has started (no more backward then)."""
        return False

    def discard(self) -> None:
        """After a failed backward: wait for what was started, so the buffers are free."""

    # ------------------------------------------------------------------ the step

    def reduce(self, loss_sums: torch.Tensor, n: int) -> torch.Tensor:
        """Reduce the buffers over the ranks; returns ``[loss sums (3), micro-batches]``
        summed over the ranks."""
        return torch.cat([loss_sums.float(), torch.full((1,), float(n), device=self.device)])

    def direction(
        self, loss_sums: torch.Tensor, n: int
    ) -> tuple[mdgd_kernels.MDGDResult | None, torch.Tensor]:
        """Run the op on the accumulated buffers of ``n`` micro-batches per rank.

        Writes the mean direction over all micro-batches of all ranks into
        ``g_theta`` and returns the op's result (None in ``mode="ft"``) and
        :meth:`reduce`'s totals.
        """
        cfg = self.config
        totals = self.reduce(loss_sums, n)
        scale = 1.0 / (n * self.world)  # the buffers hold sums over micro-batches and ranks
        g = self.theta.buffers["g"]
        if cfg.mode == "ft":
            if scale != 1.0:
                g.mul_(scale)
            return None, totals
        res = mdgd_kernels.mdgd_direction_(
            g,
            self.theta.buffers["h"],
            self.phi.buffers["g"],
            self.phi.buffers["h"],
            self.layout,
            **cfg.op_kwargs(),
            nonfinite="skip",  # "raise" is applied after the step's one sync
            backend=cfg.backend,
            names=self.segments.names,
            masked=self.masked,
            scale=scale,  # the mean over micro-batches (and ranks), inside pass 2
        )
        return res, totals

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global norm of theta's ``.grad`` (over all ranks); returns the norm."""
        params = [p for p in self.theta.params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if is_dtensor(norm) else norm


class LocalExchange(GradExchange):
    """One process: the buffers are the gradients (``distributed="none"``)."""
