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
* The op runs on the local buffers, one all-reduce of the ``[S, 10]``
  statistics between its passes (:mod:`mdgd.distributed.shards`). FSDP2
  averages over the ranks (its default divide factor), so the direction is
  scaled by ``1 / micro-batches`` only.

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

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..buffers import is_dtensor, local_tensor
from ..config import MDGDConfig
from .common import (
    Collectives,
    canonical_name,
    check_same_modality,
    fingerprint,
    is_fsdp,
    raised_by_a_collective,
)
from .shards import ShardedExchange


class FSDPExchange(ShardedExchange):
    """Buffers of the local shards of FSDP2 models (module doc)."""

    mode = "fsdp"
    supports_scaler = False
    checkpoint_format = "fsdp-dcp"

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
        self.set_local_ranges([self._local_range(p) for p in theta_params])

    @classmethod
    def build(cls, config, names, theta_params, phi_params, models, process_group=None):
        return cls(config, names, theta_params, phi_params, models)

    def collective_error(self, e: BaseException) -> Exception | None:
        if raised_by_a_collective(e):
            return fsdp_collective_failed(e, self.config.dist_timeout_s)
        return None

    def save_checkpoint(self, engine: Any, path: Path) -> Path:
        from .fsdp_checkpoint import save_fsdp

        return save_fsdp(engine, path)

    def load_checkpoint(self, engine: Any, path: Path) -> None:
        from .fsdp_checkpoint import load_fsdp

        load_fsdp(engine, path)

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
        """Text-only on every rank or on none (module doc)."""
        check_same_modality(self.comm, visual, model, batch, self.device, "FSDP2")

    def before_backward(self, kind: str, last: bool) -> None:
        """Every backward reduce-scatters: FSDP2's no-sync would mix g and h."""
        for m in self.roots:
            m.set_requires_gradient_sync(True)

    # ------------------------------------------------------------------ the step


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
