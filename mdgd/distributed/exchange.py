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
  of this rank's local shards, filled by FSDP2's reduce-scatter;
* :class:`~mdgd.distributed.deepspeed.DeepSpeedExchange` (``"deepspeed"``):
  DeepSpeed ZeRO engines, gradients read from and written to ZeRO's partitions.

What the engine calls, per micro-batch, around each of its backward calls into
buffer ``kind`` (``"g"``, then ``"h"``): :meth:`point`, :meth:`before_backward`,
:meth:`backward` and :meth:`after_backward`. ``after_backward("h", last)`` is
called even when the ``h`` backward does not run (no graph from ``L_v``), so
that a strategy which sends buffers at that point sends them on every rank. At
the step, :meth:`direction` reduces what is left, runs the op and returns its
result and the losses summed over the ranks; :meth:`assign_direction` hands
the direction to the optimizer; after a failed backward, :meth:`discard`.
A strategy also owns the wording of its collectives' failures
(:meth:`collective_error`) and its checkpoint files (:meth:`save_checkpoint`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mdgd_kernels

from ..budget import FreezeUnselected
from ..buffers import FlatGrads, Segments, is_dtensor, segment_layout
from ..config import MDGDConfig
from .common import global_shape


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
    retains_graph = True
    """False where the ``h`` backward cannot reuse the forward's graph (ZeRO-3 frees the
    gathered weights after the first backward): the engine then runs a second forward."""
    separate_losses = False
    """True where each model's backward must run on its own (one DeepSpeed engine per
    model): :meth:`backward` then gets one loss per model, each with the other model's
    side detached."""
    owns_optimizer_step = False
    """True where the strategy steps the optimizer itself (:meth:`optimizer_step`)."""
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
        shapes = self.local_shapes(theta_params)
        self.theta = FlatGrads(names, theta_params, kinds, shapes)
        self.phi = FlatGrads(names, phi_params, kinds, shapes) if phi_params is not None else None
        self.device = self.theta.device
        self.world = 1
        self.shapes = [global_shape(p) for p in theta_params]  # whole parameters
        self.numels = [math.prod(shape) for shape in self.shapes]
        self.segments: Segments = segment_layout(
            names, self.numels, config.block_size, config.granularity
        )
        # the layout of the whole trainable set; pass 1 and 2 run on it unless sharded
        self.layout = mdgd_kernels.get_layout(self.segments.sizes, self.device)
        # MDGD-GM drops whole parameters (grad = None) unless a parameter has several
        # segments ("block:K"): then pass 2 need not write zeros into dropped segments
        self.masked = "zero" if config.granularity.startswith("block") else "keep"

    def local_shapes(self, params: Sequence[nn.Parameter]) -> list[torch.Size] | None:
        """The shapes of this rank's part of each parameter, where the buffers hold only
        that part and it is not the parameter's local tensor (None: FlatGrads decides)."""
        return None

    @classmethod
    def unwrapped(
        cls, model: nn.Module, ref_model: nn.Module | None, config: MDGDConfig
    ) -> tuple[nn.Module, nn.Module | None]:
        """The modules whose parameters the engine names and checks (the models themselves
        unless a wrapper holds them); may check the models first."""
        return model, ref_model

    @classmethod
    def build(
        cls,
        config: MDGDConfig,
        names: Sequence[str],
        theta_params: Sequence[nn.Parameter],
        phi_params: Sequence[nn.Parameter] | None,
        models: Sequence[nn.Module | None],
        process_group: Any = None,
    ) -> GradExchange:
        """The exchange for an engine (:func:`mdgd.distributed.make_exchange`)."""
        return cls(config, names, theta_params, phi_params)

    @property
    def sides(self) -> list[FlatGrads]:
        return [fg for fg in (self.theta, self.phi) if fg is not None]

    # ------------------------------------------------------------------ per micro-batch

    def check_micro_batch(self, visual: Any, model: nn.Module, batch: Mapping[str, Any]) -> None:
        """Before a micro-batch's forward: raise where the ranks cannot run it together."""

    def point(self, kind: str) -> None:
        """Make the next backward accumulate into buffer ``kind`` of both models."""
        for fg in self.sides:
            fg.point(kind)

    def before_backward(self, kind: str, last: bool) -> None:
        """Called before each backward into buffer ``kind`` (after its ``.grad`` are pointed);
        ``last``: the last micro-batch before the step."""

    def backward(
        self, kind: str, losses: Sequence[torch.Tensor], retain_graph: bool, scale: Any
    ) -> None:
        """The backward of ``losses`` (one tensor, or one per model when
        :attr:`separate_losses`) into buffer ``kind``; ``scale`` is the GradScaler's."""
        scale(sum(losses)).backward(retain_graph=retain_graph)

    def after_backward(self, kind: str, last: bool) -> None:
        """Called after each backward into ``kind`` (also when the ``h`` one did not run)."""

    @property
    def launched(self) -> bool:
        """True once the last micro-batch's reduction has started (no more backward then)."""
        return False

    def discard(self) -> None:
        """After a failed backward: wait for what was started, so the buffers are free."""

    def collective_error(self, e: BaseException) -> Exception | None:
        """The error to raise instead of ``e`` when ``e`` is a failed collective of the
        wrapper's own (inside a forward or backward); None to re-raise ``e``."""
        return None

    # ------------------------------------------------------------------ the step

    def reduce(self, loss_sums: torch.Tensor, n: int) -> torch.Tensor:
        """Reduce the buffers over the ranks; returns ``[loss sums (3), micro-batches]``
        summed over the ranks."""
        return torch.cat([loss_sums.float(), torch.full((1,), float(n), device=self.device)])

    def scale(self, n: int) -> float:
        """The factor that makes the buffers' sums the mean gradients of the step."""
        return 1.0 / (n * self.world)  # sums over n micro-batches on each of the ranks

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
        scale = self.scale(n)
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

    def assign_direction(self, skipped: bool, selected: Sequence[float], scaler: bool) -> None:
        """Hand the direction in ``g_theta`` to the optimizer: theta's ``.grad`` are its
        views, None for parameters with no selected segment (``selected[j] == 0``); on a
        skipped step all None, or one Inf where a GradScaler (``scaler``) must see it."""
        if self.phi is not None:
            self.phi.detach_grads()
        if skipped and not scaler:
            self.theta.detach_grads()
            return
        self.theta.point("g")
        if skipped:  # let the GradScaler see the overflow, skip the step and back off
            self.theta.buffers["g"][:1].fill_(math.inf)
            return
        for p, keep in zip(self.theta.params, selected):
            if not keep:
                p.grad = None

    def release_grads(self) -> None:
        """After a step that raised: no ``.grad`` of either model points into the buffers."""
        for fg in self.sides:
            fg.detach_grads()

    def freezer(self, engine: Any) -> Any:
        """What keeps MDGD-GM's unselected blocks unchanged (:mod:`mdgd.budget`), or None."""
        return FreezeUnselected.for_engine(engine)

    def optimizer_step(self, skipped: bool) -> None:
        """Step the optimizer (only where :attr:`owns_optimizer_step`)."""
        raise NotImplementedError(f"the {self.mode!r} strategy does not step the optimizer")

    # ------------------------------------------------------------------ checkpoints

    checkpoint_format = "full"
    """What a checkpoint of this strategy holds (checked when one is loaded)."""

    def save_checkpoint(self, engine: Any, path: Path) -> Path:
        """Write ``engine``'s state into the directory ``path`` (:mod:`mdgd.checkpoint`)."""
        from ..checkpoint import save_full

        return save_full(engine, path)

    def load_checkpoint(self, engine: Any, path: Path) -> None:
        from ..checkpoint import load_full

        load_full(engine, path)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global norm of theta's ``.grad`` (over all ranks); returns the norm."""
        params = [p for p in self.theta.params if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if is_dtensor(norm) else norm


class LocalExchange(GradExchange):
    """One process: the buffers are the gradients (``distributed="none"``)."""
