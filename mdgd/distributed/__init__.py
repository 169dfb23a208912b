"""Multi-process MDGD: one gradient-exchange strategy per distributed mode.

* ``"none"``: :class:`LocalExchange`, one process;
* ``"dp"``: :class:`DataParallelExchange`, unwrapped models, the driver all-reduces
  the four full buffers (:mod:`mdgd.distributed.dp`);
* ``"fsdp"``: :class:`FSDPExchange`, both models wrapped by FSDP2 (``fully_shard``,
  e.g. with :func:`shard_models`), buffers of the local shards only
  (:mod:`mdgd.distributed.fsdp`).

:func:`make_exchange` picks one for an engine; :mod:`mdgd.engine` calls its
methods and never branches on the mode. See ``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..config import MDGDConfig
from .common import canonical_name, check_micro_batches, is_fsdp, resolve_mode
from .dp import DataParallelExchange
from .exchange import GradExchange, LocalExchange
from .fsdp import FSDPExchange
from .shard import shard_like, shard_models

__all__ = [
    "DataParallelExchange",
    "FSDPExchange",
    "GradExchange",
    "LocalExchange",
    "canonical_name",
    "check_micro_batches",
    "is_fsdp",
    "make_exchange",
    "resolve_mode",
    "shard_like",
    "shard_models",
]


def make_exchange(
    mode: str,
    config: MDGDConfig,
    names: Sequence[str],
    theta_params: Sequence[nn.Parameter],
    phi_params: Sequence[nn.Parameter] | None,
    models: Sequence[nn.Module | None],
    process_group: Any = None,
) -> GradExchange:
    """The exchange of ``mode`` (from :func:`resolve_mode`) for these parameters.

    ``models`` is ``(model, ref_model)``; ``process_group`` the data-parallel
    group of ``"dp"`` (FSDP2 uses its mesh's group).
    """
    if mode == "fsdp":
        return FSDPExchange(config, names, theta_params, phi_params, models)
    if mode == "dp":
        return DataParallelExchange(config, names, theta_params, phi_params, process_group)
    return LocalExchange(config, names, theta_params, phi_params)
