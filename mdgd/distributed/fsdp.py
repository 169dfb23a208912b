"""MDGD on FSDP2 (``distributed="fsdp"``): sharded weights, gradients and optimizer state.

Both models are wrapped by ``torch.distributed.fsdp.fully_shard`` the same way
(:func:`mdgd.shard_models`), so every trainable parameter of theta and its twin
in phi is a ``DTensor`` sharded on dim 0 with the same local shape on each rank.

* Capture: the exchange owns four flat buffers of this rank's *local* shards.
  Before each backward the engine points every trainable ``.grad`` at a
  ``DTensor`` view of the right buffer; FSDP2's reduce-scatter then accumulates
  (``+=``) the averaged sharded gradient into it. No copy, and no full-size
  gradient exists anywhere (FSDP2's own reduce-scatter output is transient).
* Gradient sync stays on for every backward: FSDP2's no-sync accumulation keeps
  one unsharded ``.grad`` per parameter, which would mix ``g`` and ``h``.
* The statistics are sums over elements, so each rank runs pass 1 on its local
  buffers with a *local* segment layout (each segment's pieces inside this
  rank's shards), adds the pieces into the global ``[S, 10]`` table, and one
  ``all_reduce`` carries that table together with the loss sums and the
  micro-batch count. Every rank derives the same coefficients and MDGD-GM mask
  from it, and pass 2 writes the direction into the local shards.
* FSDP2 averages over the ranks (its default divide factor), so the direction
  is scaled by ``1 / micro-batches`` only.

Every rank must run the same modules in every micro-batch: each FSDP2 unit
all-gathers in forward and reduce-scatters in backward, both collectives. A
micro-batch with no image token skips the vision tower, the projector and the
``h`` backward, so under FSDP2 the ranks' micro-batches must be text-only
together or not at all (as LLaVA's modality-grouped sampler makes them);
:meth:`FSDPExchange.check_micro_batch` raises the same ValueError on every rank
otherwise, instead of a collective mismatch or a hang. When one of FSDP2's own
collectives fails inside a forward or backward anyway, the engine re-raises it
as :func:`fsdp_collective_failed` says.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

import mdgd_kernels
from mdgd_kernels.coeffs import coefficients

from ..batches import is_text_only
from ..buffers import is_dtensor, local_tensor
from ..config import MDGDConfig
from .common import Collectives, canonical_name, fingerprint, is_fsdp
from .exchange import GradExchange


class FSDPExchange(GradExchange):
    """Buffers of the local shards of FSDP2 models (module doc)."""

    mode = "fsdp"
    supports_scaler = False

    def __init__(
        self,
        config: MDGDConfig,
        names: Sequence[str],
        theta_params: Sequence[nn.Parameter],
        phi_params: Sequence[nn.Parameter] | None,
        models: Sequence[nn.Module],
    ) -> None:
        error = wrapping_difference(models, names, theta_params, phi_params)
        mesh = theta_params[0].device_mesh if is_dtensor(theta_params[0]) else None
        group = mesh.get_group() if mesh is not None and mesh.ndim == 1 else None
        self.comm = Collectives(group, config.dist_timeout_s)
        self.world = self.comm.world
        self.comm.check_agreement(
            fingerprint(
                list(names),
                [tuple(p.shape) for p in theta_params],
                theta_params[0].dtype,
                theta_params[0].device,
                [p.numel() for p in theta_params],
                config.to_dict(),
                self.mode,
            ),
            error,
        )
        super().__init__(config, names, theta_params, phi_params)
        self.world = self.comm.world
        self.roots = [m for m in models if m is not None]
        self.local_ranges = ranges = [self._local_range(p) for p in theta_params]
        numels = [p.numel() for p in theta_params]
        seg, _, length = local_pieces(self.segments.sizes, numels, ranges)
        self.seg_of_piece = torch.tensor(seg, dtype=torch.int64, device=self.device)
        self.local_layout = mdgd_kernels.get_layout(length, self.device) if length else None

    def _local_range(self, p: torch.Tensor) -> tuple[int, int]:
        """This rank's range ``[lo, hi)`` of ``p``'s flat global elements (Shard(0))."""
        rows = p.shape[0]
        per = -(-rows // self.world)
        r0 = min(self.comm.rank * per, rows)
        r1 = min(r0 + per, rows)
        cols = p.numel() // rows if rows else 0
        return r0 * cols, r1 * cols

    # ------------------------------------------------------------------ per micro-batch

    def check_micro_batch(self, visual: Any, model: nn.Module, batch: Mapping[str, Any]) -> None:
        """Text-only on every rank or on none (module doc); one tiny all-reduce."""
        flag = torch.tensor([float(is_text_only(visual, model, batch))], device=self.device)
        text_only = int(self.comm.all_reduce(flag, "all-reduce of the text-only flags").item())
        if 0 < text_only < self.world:
            raise ValueError(
                f"under FSDP2 the ranks' micro-batches must all have images or all be "
                f"text-only, but {text_only} of {self.world} ranks have a text-only one: each "
                "rank would run other FSDP2 collectives (the vision tower's). Group the "
                "samples by modality across ranks (LLaVA's group_by_modality_length does), or "
                "use distributed='dp'"
            )

    def before_backward(self, kind: str, last: bool) -> None:
        """Every backward reduce-scatters: FSDP2's no-sync would mix g and h."""
        for m in self.roots:
            m.set_requires_gradient_sync(True)

    # ------------------------------------------------------------------ the step

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
        scale = 1.0 / n  # FSDP2's reduce-scatter already averaged over the ranks
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


def raised_by_a_collective(e: BaseException) -> bool:
    """Whether ``e`` came out of a torch.distributed collective (its innermost frame)."""
    if not isinstance(e, RuntimeError):
        return False
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith("distributed_c10d.py")


def fsdp_collective_failed(e: Exception, timeout_s: float) -> RuntimeError:
    """FSDP2's own collectives (not the driver's) failed inside a forward or backward."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return RuntimeError(
        f"mdgd (rank {rank} of {world}): an FSDP2 collective of the forward/backward "
        f"(all-gather of the parameters or reduce-scatter of the gradients) did not complete "
        f"({e}). FSDP2 waits for the process group's timeout, not MDGDConfig.dist_timeout_s "
        f"({timeout_s:g} s). Another rank failed or did not reach the same step: check the "
        "other ranks' logs"
    )


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


def wrapping_difference(
    models: Sequence[nn.Module | None],
    names: Sequence[str],
    theta_params: Sequence[torch.Tensor],
    phi_params: Sequence[torch.Tensor] | None,
) -> str | None:
    """The first way in which theta and phi are not sharded alike, or None.

    Checks: the same FSDP units (module names), every trainable parameter a
    ``DTensor`` with ``Shard(0)`` on a 1-D mesh, and the same local shard shapes.
    """
    model, ref_model = models
    hint = "; wrap both models the same way, e.g. with mdgd.shard_models(model, ref_model)"
    if ref_model is not None:
        units = [_units(model), _units(ref_model)]
        if units[0] != units[1]:
            only = [sorted(set(units[0]) - set(units[1])), sorted(set(units[1]) - set(units[0]))]
            where = "model" if only[0] else "ref_model"
            name = (only[0] or only[1] or ["(same units, different order)"])[0]
            return (
                f"model and ref_model are sharded differently: {where} has the FSDP unit "
                f"{name!r} and the other has not ({len(units[0])} vs {len(units[1])} units)" + hint
            )
    pairs = zip(names, theta_params, phi_params if phi_params is not None else theta_params)
    for name, p, q in pairs:
        for which, t in (("model", p), ("ref_model", q)):
            if not is_dtensor(t):
                return f"{which}'s trainable parameter {name!r} is not sharded by FSDP2" + hint
            if t.device_mesh.ndim != 1 or not _shard0(t.placements):
                return (
                    f"{which}'s {name!r} has placements {t.placements} on a {t.device_mesh.ndim}-D "
                    "mesh; MDGD supports FSDP2's Shard(0) on a 1-D mesh" + hint
                )
        if local_tensor(p).shape != local_tensor(q).shape:
            return (
                f"{name!r}: this rank's shard is {tuple(local_tensor(p).shape)} in model but "
                f"{tuple(local_tensor(q).shape)} in ref_model" + hint
            )
    return None


def _shard0(placements: Sequence[Any]) -> bool:
    from torch.distributed.tensor import Shard

    return len(placements) == 1 and isinstance(placements[0], Shard) and placements[0].dim == 0


def _units(model: nn.Module) -> list[str]:
    return [canonical_name(n) for n, m in model.named_modules() if is_fsdp(m)]
