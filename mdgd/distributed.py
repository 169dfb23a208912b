"""Multi-process MDGD on ``torch.distributed``: data-parallel and sharded modes.

MDGD's projections are not linear in the gradients, so MDGD of averaged
gradients is not the average of per-rank MDGD: the four gradient sets are
reduced across the ranks *before* the statistics pass. The engine owns the
collectives (no DDP wrapper: DDP averages only the first of two backward calls).

``"dp"`` (data-parallel): during the last micro-batch's two backward calls the
four buffers are all-reduced (SUM, asynchronously) in buckets of
``dist_bucket_mb``, each bucket as soon as gradient hooks report it complete
(in one fixed order on every rank), while autograd computes the rest.
Every rank then runs the fused op on identical buffers and divides the
direction by the number of micro-batches over all ranks, which is the
single-process step on the union of the ranks' micro-batches (the direction is
homogeneous of degree 1 in a common scale of the four gradients).

``"sharded"`` (ZeRO-2 style): the four buffers are reduce-scattered, so rank
``r`` owns the contiguous range ``[r*L, (r+1)*L)`` of the flat space (``L`` =
``ceil(N / world) ``; the buffers are zero-padded to ``world * L``). Pass 1 runs
on the owned pieces of the segments (a segment may straddle ranks); the
``[pieces, 10]`` partial statistics are summed into the global ``[S, 10]`` and
all-reduced (tiny), the coefficients are computed from them on every rank (so
all ranks agree on the mask and on skipping), pass 2 writes the direction into
the owned range, the optimizer steps 1-D pieces of the parameters that are
views of one flat parameter buffer, and the updated range is all-gathered.
Elementwise optimizers (SGD, Adam, AdamW) give what ``"dp"`` gives, up to the
float32 summation order of the statistics.

Before the first step every rank all-gathers a fingerprint of its trainable
names and shapes, dtypes, segment layout and config; any disagreement raises a
ValueError naming it, on every rank. Collectives wait with a timeout
(``MDGDConfig.dist_timeout_s``) on gloo, so a missing rank raises instead of
hanging.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import math
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

import mdgd_kernels
from mdgd_kernels.coeffs import coefficients

if TYPE_CHECKING:
    from .engine import MDGDEngine

# torch 2.13 renamed the single-tensor collectives (the old names warn); older torch has only those
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

FINGERPRINT_PARTS = (
    "trainable parameter names and shapes",
    "parameter dtypes and device type",
    "segment layout (granularity)",
    "MDGDConfig (mode, align, alpha, alpha_by, visual_weight, eps, ...)",
    "distributed mode",
)


def resolve_mode(requested: str) -> str:
    """``"none"``, ``"dp"`` or ``"sharded"`` for ``MDGDConfig.distributed``."""
    ready = dist.is_available() and dist.is_initialized()
    if requested == "auto":
        return "dp" if ready and dist.get_world_size() > 1 else "none"
    if requested in ("dp", "sharded") and not ready:
        raise ValueError(
            f"distributed={requested!r} needs torch.distributed: call "
            "torch.distributed.init_process_group(...) first (torchrun / accelerate launch "
            "set the environment for it), or use distributed='none'"
        )
    return requested


def reject_wrapped(model: nn.Module, which: str) -> None:
    """DDP / FSDP wrappers own gradient reduction; the MDGD driver must own it instead."""
    names = {c.__name__ for c in type(model).__mro__}
    wrapper = names & {"DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule"}
    if wrapper:
        raise ValueError(
            f"{which} is wrapped in {sorted(wrapper)[0]}: pass the unwrapped model. The MDGD "
            "driver owns the collectives (MDGDConfig(distributed='dp' or 'sharded')): DDP "
            "averages only the first of MDGD's two backward calls and FSDP shards the "
            "gradients MDGD reads"
        )


def shard_range(numel: int, world: int, rank: int) -> tuple[int, int, int]:
    """``(lo, hi, padded)``: rank's owned range of the padded flat space of ``numel``."""
    per = -(-numel // world)
    return rank * per, (rank + 1) * per, per * world


def pieces(sizes: Sequence[int], lo: int, hi: int) -> tuple[list[int], list[int], list[int]]:
    """The parts of the segments ``sizes`` inside ``[lo, hi)``.

    Returns (segment index, start relative to ``lo``, length) lists, in order.
    """
    idx, start, length = [], [], []
    a = 0
    for s, n in enumerate(sizes):
        b = a + n
        x, y = max(a, lo), min(b, hi)
        if y > x:
            idx.append(s)
            start.append(x - lo)
            length.append(y - x)
        a = b
    return idx, start, length


def _fingerprint(engine: MDGDEngine, mode: str) -> list[int]:
    theta = engine.theta
    cfg = {
        k: v
        for k, v in engine.config.to_dict().items()
        # the backend and the waiting/bucketing settings may differ per rank: same function
        if k not in ("distributed", "dist_timeout_s", "dist_bucket_mb", "backend")
    }
    parts = [
        [(n, tuple(p.shape)) for n, p in zip(theta.names, theta.params)],
        [str(theta.dtype), theta.device.type],
        list(engine.segments.sizes),
        sorted(cfg.items()),
        mode,
    ]
    out = []
    for part in parts:
        digest = hashlib.sha256(repr(part).encode()).digest()
        out.append(int.from_bytes(digest[:8], "little", signed=True))
    return out + [len(theta.params), theta.numel, len(engine.segments.sizes)]


class DistributedMDGD:
    """The collectives of one :class:`MDGDEngine` (built by the engine; see module doc)."""

    def __init__(
        self,
        engine: MDGDEngine,
        mode: str,
        optimizer: torch.optim.Optimizer | OptimizerFactory | None,
        group: Any = None,
    ) -> None:
        cfg = engine.config
        self.engine = engine
        self.mode = mode
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.timeout = datetime.timedelta(seconds=float(cfg.dist_timeout_s))
        # NCCL's wait(timeout) blocks the host; there the process group's watchdog times out
        self._host_wait = dist.get_backend(group) != "nccl"
        self.bucket = max(1, int(cfg.dist_bucket_mb * 2**20) // engine.theta.dtype.itemsize)
        self._pending: list[tuple[Any, str]] = []
        self._launched: list[str] = []
        self._armed: str | None = None  # dp: the buffer whose backward is under way
        self.early_buckets = 0  # dp: buckets all-reduced from a hook, inside a backward

        self._check_agreement(_fingerprint(engine, mode))
        theta = engine.theta
        self.kinds = list(theta.buffers)
        self.sides = [fg for fg in (engine.theta, engine.phi) if fg is not None]
        if mode == "sharded":
            self._setup_sharded(optimizer)
        else:
            self._broadcast_params()
            self.optimizer = optimizer
            self._setup_buckets()

    # ------------------------------------------------------------------ collectives

    def _wait(self, work: Any, what: str) -> None:
        try:
            if self._host_wait:
                work.wait(timeout=self.timeout)
            else:
                work.wait()
        except RuntimeError as e:
            raise RuntimeError(
                f"mdgd (rank {self.rank} of {self.world}): the {what} did not complete "
                f"({e}); timeout {self.timeout.total_seconds():g} s "
                "(MDGDConfig.dist_timeout_s). Another rank failed or did not reach the same "
                "step: check the other ranks' logs"
            ) from e

    def _check_agreement(self, mine: list[int]) -> None:
        local = torch.tensor(mine, dtype=torch.int64)
        if dist.get_backend(self.group) == "nccl":
            local = local.cuda()
        every = torch.empty(self.world * local.numel(), dtype=torch.int64, device=local.device)
        work = _all_gather_single(every, local, group=self.group, async_op=True)
        try:
            work.wait(timeout=self.timeout)  # once, at construction: a host wait is fine
        except RuntimeError as e:
            raise RuntimeError(
                f"mdgd (rank {self.rank} of {self.world}): the other ranks did not check in "
                f"their configuration within {self.timeout.total_seconds():g} s "
                "(MDGDConfig.dist_timeout_s): one of them failed before constructing its "
                f"MDGDEngine, or never constructs one ({e})"
            ) from e
        rows = every.view(self.world, -1).cpu().tolist()
        for r, row in enumerate(rows):
            for i, what in enumerate(FINGERPRINT_PARTS):
                if row[i] != rows[0][i]:
                    n0, e0, s0 = rows[0][-3:]
                    n1, e1, s1 = row[-3:]
                    raise ValueError(
                        f"mdgd: ranks disagree on the {what}: rank 0 and rank {r} differ "
                        f"(rank 0: {n0} trainable tensors, {e0:,} elements, {s0} segments; "
                        f"rank {r}: {n1} tensors, {e1:,} elements, {s1} segments). Every rank "
                        "must build the same model, trainable patterns and MDGDConfig"
                    )

    def _broadcast_params(self) -> None:
        """Start every rank from rank 0's trainable parameters (as DDP does)."""
        params = self.engine.theta.params
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            self._wait(
                dist.broadcast(flat, src=self._global_rank(0), group=self.group, async_op=True),
                "broadcast of the initial parameters",
            )
            for p, v in zip(params, torch.split(flat, [p.numel() for p in params])):
                p.copy_(v.view(p.shape))

    def _global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    # ------------------------------------------------------------------ dp buckets

    def _setup_buckets(self) -> None:
        """Buckets of the flat buffers, and a gradient hook per trainable parameter.

        Both models have the same layout, so one bucket table serves the four
        buffers. While a backward is *armed* (the last micro-batch's, see
        :meth:`arm`), the hook of a parameter whose gradient is complete counts
        it off the buckets it overlaps; buckets are all-reduced in one fixed
        order on every rank (last bucket first, theta before phi: the order in
        which a backward completes them), each as soon as it and all before it
        are complete, while the backward goes on with the rest. Collectives
        must be issued in the same order on every rank, so a bucket that is
        complete early waits for its turn, as in DDP.
        """
        n = self.engine.theta.numel
        self.buckets = [(lo, min(lo + self.bucket, n)) for lo in range(0, n, self.bucket)]
        self._param_buckets: list[range] = []
        counts = [0] * len(self.buckets)
        start = 0
        for size in self.engine.theta.sizes:
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

    def arm(self, kind: str) -> None:
        """The next backward fills buffer ``kind`` for the last time before the step."""
        if self.mode == "dp":
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
                self.sides[side].buffers[kind][lo:hi], group=self.group, async_op=True
            )
            self._pending.append((work, f"reduction of the {kind} buffer"))
            if not final:
                self.early_buckets += 1

    # ------------------------------------------------------------------ sharded set-up

    def _setup_sharded(self, optimizer: Any) -> None:
        engine = self.engine
        theta = engine.theta
        n = theta.numel
        self.lo, self.hi, self.padded = shard_range(n, self.world, self.rank)
        self.valid = max(0, min(self.hi, n) - self.lo)  # the rest of the range is padding
        if engine.scaler is not None:
            raise ValueError(
                "distributed='sharded' does not support a GradScaler (its overflow check "
                "would see only this rank's range); use bf16, or distributed='dp'"
            )
        if isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                "distributed='sharded' steps only this rank's range of the parameters: pass an "
                "optimizer factory, e.g. optimizer=lambda params: torch.optim.AdamW(params, "
                "lr=1e-5), not an optimizer built over the full parameters"
            )
        # zero-padded buffers, so that reduce_scatter gets equal pieces
        self.full: dict[tuple[int, str], torch.Tensor] = {}
        for i, fg in enumerate(self.sides):
            for kind in list(fg.buffers):
                big = torch.zeros(self.padded, dtype=fg.dtype, device=fg.device)
                fg.buffers[kind] = big[:n]
                fg.views[kind] = [
                    v.view(p.shape) for v, p in zip(torch.split(big[:n], fg.sizes), fg.params)
                ]
                self.full[(i, kind)] = big
        per = self.hi - self.lo
        self.shard = {
            key: torch.zeros(per, dtype=theta.dtype, device=theta.device) for key in self.full
        }
        # the trainable parameters become views of one flat buffer; the optimizer steps
        # 1-D pieces of it (views too) inside the owned range
        self.flat_params = torch.zeros(self.padded, dtype=theta.dtype, device=theta.device)
        with torch.no_grad():
            for p, v in zip(theta.params, torch.split(self.flat_params[:n], theta.sizes)):
                v.copy_(p.detach().reshape(-1))
                p.data = v.view(p.shape)
        self._broadcast_flat_params()
        owner, start, length = pieces(theta.sizes, self.lo, self.hi)
        self.piece_owner = owner  # the parameter each piece belongs to
        self.piece_slices = [(a, a + m) for a, m in zip(start, length)]
        self.pieces = [
            nn.Parameter(self.flat_params[self.lo + a : self.lo + b]) for a, b in self.piece_slices
        ]
        self.piece_names = [
            f"{theta.names[o]}[{self.lo + a - sum(theta.sizes[:o])}:"
            f"{self.lo + b - sum(theta.sizes[:o])}]"
            for o, (a, b) in zip(owner, self.piece_slices)
        ]
        seg, seg_start, seg_len = pieces(engine.segments.sizes, self.lo, self.hi)
        dev = theta.device
        self.seg_of_piece = torch.tensor(seg, dtype=torch.int64, device=dev)
        self.local_layout = mdgd_kernels.get_layout(seg_len, dev) if seg_len else None
        self.optimizer = optimizer(self.pieces) if optimizer is not None else None
        if self.optimizer is not None:
            held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
            if held != {id(p) for p in self.pieces}:
                raise ValueError(
                    "the optimizer factory must build the optimizer over exactly the "
                    "parameters it is given (this rank's pieces of the trainable parameters)"
                )

    def _broadcast_flat_params(self) -> None:
        self._wait(
            dist.broadcast(
                self.flat_params, src=self._global_rank(0), group=self.group, async_op=True
            ),
            "broadcast of the initial parameters",
        )

    # ------------------------------------------------------------------ per step

    def launch(self, kind: str) -> None:
        """Start the reduction of buffer ``kind`` of both models (asynchronous);
        in ``"dp"`` the buckets a gradient hook has not sent yet."""
        if kind in self._launched:
            return
        self._launched.append(kind)
        if self.mode == "sharded":
            for i in range(len(self.sides)):
                work = _reduce_scatter_single(
                    self.shard[(i, kind)], self.full[(i, kind)], group=self.group, async_op=True
                )
                self._pending.append((work, f"reduction of the {kind} buffer"))
            return
        if self._armed != kind:  # no armed backward filled it (e.g. L_v had no graph)
            self.arm(kind)
        self._send_in_order(kind, final=True)
        self._armed = None

    @property
    def launched(self) -> bool:
        return bool(self._launched)

    def finish(self, loss_sums: torch.Tensor, n: int) -> torch.Tensor:
        """Reduce what is left; returns ``[loss sums (3), micro-batches]`` summed over ranks."""
        for kind in self.kinds:
            self.launch(kind)
        small = torch.cat([loss_sums.float(), torch.full((1,), float(n), device=loss_sums.device)])
        self._pending.append(
            (dist.all_reduce(small, group=self.group, async_op=True), "reduction of the losses")
        )
        try:
            for work, what in self._pending:
                self._wait(work, what)
        finally:
            self._pending.clear()
            self._launched.clear()
        return small

    def discard(self) -> None:
        """After a failed backward: wait for what was started, so the buffers are free."""
        pending, self._pending = self._pending, []
        self._launched.clear()
        self._armed = None
        for work, what in pending:
            self._wait(work, what)

    def shard_buffers(self) -> list[torch.Tensor]:
        """This rank's reduced ranges of ``g_theta, h_theta, g_phi, h_phi`` (valid part)."""
        keys = [(0, "g"), (0, "h"), (1, "g"), (1, "h")]
        return [self.shard[k][: self.valid] for k in keys if k in self.shard]

    def sharded_direction(self, scale: float, masked: str) -> mdgd_kernels.MDGDResult:
        """Statistics on the owned pieces, summed over ranks; pass 2 on the owned range.

        ``scale`` and ``masked`` as in :func:`mdgd_kernels.mdgd_direction_`.
        """
        engine, cfg = self.engine, self.engine.config
        layout = engine.layout
        stats = torch.zeros(layout.num_segments, 10, dtype=torch.float32, device=engine.device)
        bufs = self.shard_buffers()
        if self.local_layout is not None:
            local = mdgd_kernels.segment_gram(*bufs, self.local_layout, backend=cfg.backend)
            stats.index_add_(0, self.seg_of_piece, local)
        self._wait(
            dist.all_reduce(stats, group=self.group, async_op=True),
            "all-reduce of the [S, 10] statistics",
        )
        coef = coefficients(
            stats,
            layout.sizes_t,
            mode=cfg.mode,
            alpha=cfg.alpha,
            align=cfg.align,
            alpha_by=cfg.alpha_by,
            eps=cfg.eps,
            masked=masked,
            scale=scale,
        )
        if self.local_layout is not None:
            mdgd_kernels.segment_combine_(
                *bufs, self.local_layout, coef.coeffs[self.seg_of_piece], backend=cfg.backend
            )
        return mdgd_kernels.MDGDResult.of(coef, stats)

    def assign(self, skipped: bool, selected: Sequence[float]) -> None:
        """Point the pieces' ``.grad`` at the owned direction (None where masked/skipped)."""
        g = self.shard[(0, "g")]
        for piece, o, (a, b) in zip(self.pieces, self.piece_owner, self.piece_slices):
            keep = not skipped and (not selected or selected[o])
            piece.grad = g[a:b] if keep else None

    def gather_params(self) -> None:
        """All-gather the updated ranges into every rank's flat parameter buffer."""
        mine = self.flat_params[self.lo : self.hi].clone()
        self._wait(
            _all_gather_single(self.flat_params, mine, group=self.group, async_op=True),
            "all-gather of the updated parameters",
        )

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the global norm of the direction (over all ranks); returns the norm."""
        if self.mode != "sharded":
            params = [p for p in self.engine.theta.params if p.grad is not None]
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        grads = [p.grad for p in self.pieces if p.grad is not None]
        sq = torch.zeros((), dtype=torch.float32, device=self.engine.device)
        for gr in grads:
            sq += gr.float().pow(2).sum()
        self._wait(dist.all_reduce(sq, group=self.group, async_op=True), "all-reduce of the norm")
        norm = sq.sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for gr in grads:
            gr.mul_(scale.to(gr.dtype))
        return norm


def _grad_ready(ref: weakref.ref, side: int, j: int, _param: torch.Tensor) -> None:
    """``post_accumulate_grad`` hook; a weak reference, so that hooks left on a model
    keep no engine alive (and do nothing once it is gone)."""
    owner = ref()
    if owner is not None:
        owner._ready(side, j)


def check_micro_batches(total: float, n: int, world: int) -> None:
    """Every rank must accumulate the same number of micro-batches per step."""
    if not math.isclose(total, n * world):
        raise ValueError(
            f"mdgd: this rank accumulated {n} micro-batch(es) but the {world} ranks "
            f"{int(total)} in all: every rank must run the same number of micro-batches "
            "per optimizer step"
        )
