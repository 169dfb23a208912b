"""Data-parallel MDGD (``distributed="dp"``): full buffers, all-reduced in buckets.

MDGD's projections are not linear in the gradients, so MDGD of averaged
gradients is not the average of per-rank MDGD: the four gradient sets are
reduced across the ranks *before* the statistics pass. The engine owns the
collectives (no DDP wrapper: DDP averages only the first of two backward calls).

During the last micro-batch's two backward calls the four buffers are
all-reduced (SUM, asynchronously) in buckets of ``dist_bucket_mb``, each bucket
as soon as gradient hooks report it complete (in one fixed order on every
rank), while autograd computes the rest. Every rank then runs the fused op on
identical buffers and divides the direction by the number of micro-batches
over all ranks, which is the single-process step on the union of the ranks'
micro-batches (the direction is homogeneous of degree 1 in a common scale of
the four gradients).

A rank whose last micro-batch runs no ``h`` backward (no graph from ``L_v``)
sends all the ``h`` buckets from :meth:`after_backward`, in the same order as
a rank whose hooks sent them: the collectives match and nothing hangs.

Before the first step every rank all-gathers a fingerprint of its trainable
names and shapes, dtypes, segment layout and config; any disagreement raises a
ValueError naming it, on every rank. Collectives wait with a timeout
(``MDGDConfig.dist_timeout_s``) on gloo, so a missing rank raises instead of
hanging.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import MDGDConfig
from .common import Collectives, fingerprint
from .exchange import GradExchange


class DataParallelExchange(GradExchange):
    """Full buffers on every rank, summed over the ranks before the op (module doc)."""

    mode = "dp"

    def __init__(
        self,
        config: MDGDConfig,
        names: Sequence[str],
        theta_params: Sequence[nn.Parameter],
        phi_params: Sequence[nn.Parameter] | None,
        group: Any = None,
    ) -> None:
        super().__init__(config, names, theta_params, phi_params)
        self.comm = Collectives(group, config.dist_timeout_s)
        self.world = self.comm.world
        self.bucket = max(1, int(config.dist_bucket_mb * 2**20) // self.theta.dtype.itemsize)
        self._pending: list[tuple[Any, str]] = []
        self._launched: list[str] = []
        self._armed: str | None = None  # the buffer whose last backward is under way
        self.early_buckets = 0  # buckets all-reduced from a hook, inside a backward
        theta = self.theta
        self.comm.check_agreement(
            fingerprint(
                theta.names,
                [tuple(p.shape) for p in theta.params],
                theta.dtype,
                theta.device,
                self.segments.sizes,
                config.to_dict(),
                self.mode,
            )
        )
        self._broadcast_params()
        self._setup_buckets()

    @classmethod
    def build(cls, config, names, theta_params, phi_params, models, process_group=None):
        return cls(config, names, theta_params, phi_params, process_group)

    def _broadcast_params(self) -> None:
        """Start every rank from rank 0's trainable parameters (as DDP does)."""
        params = self.theta.params
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            work = dist.broadcast(
                flat, src=self.comm.global_rank(0), group=self.comm.group, async_op=True
            )
            self.comm.wait(work, "broadcast of the initial parameters")
            for p, v in zip(params, torch.split(flat, [p.numel() for p in params])):
                p.copy_(v.view(p.shape))

    # ------------------------------------------------------------------ buckets

    def _setup_buckets(self) -> None:
        """Buckets of the flat buffers, and a gradient hook per trainable parameter.

        Both models have the same layout, so one bucket table serves the four
        buffers. While a backward is *armed* (the last micro-batch's), the hook
        of a parameter whose gradient is complete counts it off the buckets it
        overlaps; buckets are all-reduced in one fixed order on every rank (last
        bucket first, theta before phi: the order in which a backward completes
        them), each as soon as it and all before it are complete, while the
        backward goes on with the rest. Collectives must be issued in the same
        order on every rank, so a bucket that is complete early waits for its
        turn, as in DDP.
        """
        n = self.theta.numel
        self.buckets = [(lo, min(lo + self.bucket, n)) for lo in range(0, n, self.bucket)]
        self._param_buckets: list[range] = []
        counts = [0] * len(self.buckets)
        start = 0
        for size in self.theta.sizes:
            touched = range(start // self.bucket, (start + size - 1) // self.bucket + 1)
            touched = touched if size else range(0)
            for k in touched:
                counts[k] += 1
            self._param_buckets.append(touched)
            start += size
        self._counts = counts
        self._order = [
            (side, k) for k in reversed(range(len(self.buckets))) for side in range(len(self.sides))
        ]
        me = weakref.ref(self)
        for side, fg in enumerate(self.sides):
            for j, p in enumerate(fg.params):
                p.register_post_accumulate_grad_hook(functools.partial(_grad_ready, me, side, j))

    def _arm(self, kind: str) -> None:
        self._armed = kind
        self._left = [list(self._counts) for _ in self.sides]
        self._complete: set[tuple[int, int]] = set()
        self._fired: set[tuple[int, int]] = set()
        self._next = 0

    def _ready(self, side: int, j: int) -> None:
        if self._armed is None:
            return
        if (side, j) in self._fired:  # its bucket may be on the wire already
            raise RuntimeError(
                f"mdgd: {self.sides[side].names[j]} received its gradient twice in one "
                "backward (reentrant activation checkpointing over a shared weight?); its "
                "bucket may already be all-reduced. Use non-reentrant checkpointing "
                "(use_reentrant=False)"
            )
        self._fired.add((side, j))
        left = self._left[side]
        for k in self._param_buckets[j]:
            left[k] -= 1
            if left[k] == 0:
                self._complete.add((side, k))
        self._send_in_order(self._armed, final=False)

    def _send_in_order(self, kind: str, final: bool) -> None:
        """Send the buckets of ``kind`` in ``_order`` up to the first incomplete one
        (all of them when ``final``)."""
        while self._next < len(self._order):
            side, k = self._order[self._next]
            if not final and (side, k) not in self._complete:
                break
            self._next += 1
            lo, hi = self.buckets[k]
            work = dist.all_reduce(
                self.sides[side].buffers[kind][lo:hi], group=self.comm.group, async_op=True
            )
            self._pending.append((work, f"reduction of the {kind} buffer"))
            if not final:
                self.early_buckets += 1

    # ------------------------------------------------------------------ per micro-batch

    def before_backward(self, kind: str, last: bool) -> None:
        """The last backward into ``kind``: its buckets may be sent as they fill."""
        if last:
            self._arm(kind)

    def after_backward(self, kind: str, last: bool) -> None:
        if last:
            self._launch(kind)

    def _launch(self, kind: str) -> None:
        """Start the reduction of the buckets of ``kind`` that no hook has sent yet."""
        if kind in self._launched:
            return
        self._launched.append(kind)
        if self._armed != kind:  # no armed backward filled it (e.g. L_v had no graph)
            self._arm(kind)
        self._send_in_order(kind, final=True)
        self._armed = None

    @property
    def launched(self) -> bool:
        return bool(self._launched)

    def discard(self) -> None:
        pending, self._pending = self._pending, []
        self._launched.clear()
        self._armed = None
        for work, what in pending:
            self.comm.wait(work, what)

    # ------------------------------------------------------------------ the step

    def reduce(self, loss_sums: torch.Tensor, n: int) -> torch.Tensor:
        for kind in self.theta.buffers:
            self._launch(kind)
        small = super().reduce(loss_sums, n)
        work = dist.all_reduce(small, group=self.comm.group, async_op=True)
        self._pending.append((work, "reduction of the losses"))
        try:
            for work, what in self._pending:
                self.comm.wait(work, what)
        finally:
            self._pending.clear()
            self._launched.clear()
        return small


def _grad_ready(ref: weakref.ref, side: int, j: int, _param: torch.Tensor) -> None:
    """``post_accumulate_grad`` hook; a weak reference, so that hooks left on a model
    keep no engine alive (and do nothing once it is gone)."""
    owner = ref()
    if owner is not None:
        owner._ready(side, j)
