"""Multi-process MDGD: one gradient-exchange strategy per distributed mode.

* ``"none"``: :class:`LocalExchange`, one process;
* ``"dp"``: :class:`DataParallelExchange`, unwrapped models, the driver all-reduces
  the four full buffers (:mod:`mdgd.distributed.dp`);
* ``"fsdp"``: :class:`FSDPExchange`, both models wrapped by FSDP2 (``fully_shard``,
  e.g. with :func:`shard_models`), buffers of the local shards only
  (:mod:`mdgd.distributed.fsdp`);
* ``"deepspeed"``: :class:`DeepSpeedExchange`, both models DeepSpeed ZeRO engines
  (e.g. from :func:`deepspeed_models`), gradients read from and written to ZeRO's
  partitions (:mod:`mdgd.distributed.deepspeed`).

:func:`make_exchange` builds one for an engine; :mod:`mdgd.engine`,
:mod:`mdgd.checkpoint` and :mod:`mdgd.integrations.hf` call its methods (and
those of :mod:`mdgd.distributed.trainer`) and never branch on the mode. See
``docs/distributed.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..config import DISTRIBUTED, MDGDConfig
from .common import (
    canonical_name,
    check_micro_batches,
    global_numel,
    global_shape,
    is_deepspeed,
    is_fsdp,
    resolve_mode,
    unwrap,
)
from .deepspeed import DeepSpeedExchange, deepspeed_models
from .dp import DataParallelExchange
from .exchange import GradExchange, LocalExchange
from .fsdp import FSDPExchange
from .shard import shard_like, shard_models

__all__ = [
    "DataParallelExchange",
    "DeepSpeedExchange",
    "FSDPExchange",
    "GradExchange",
    "LocalExchange",
    "STRATEGIES",
    "canonical_name",
    "check_micro_batches",
    "deepspeed_models",
    "exchange_class",
    "global_numel",
    "global_shape",
    "is_deepspeed",
    "is_fsdp",
    "make_exchange",
    "resolve_mode",
    "shard_like",
    "shard_models",
    "unwrap",
]

STRATEGIES: dict[str, type[GradExchange]] = {
    "none": LocalExchange,
    "dp": DataParallelExchange,
    "fsdp": FSDPExchange,
    "deepspeed": DeepSpeedExchange,
}
assert set(STRATEGIES) == set(DISTRIBUTED) - {"auto"}, "MDGDConfig.distributed's choices"


def exchange_class(mode: str) -> type[GradExchange]:
    """The strategy of ``mode`` (from :func:`resolve_mode`)."""
    return STRATEGIES[mode]


def make_exchange(
    strategy: type[GradExchange],
    config: MDGDConfig,
    names: Sequence[str],
    theta_params: Sequence[nn.Parameter],
    phi_params: Sequence[nn.Parameter] | None,
    models: Sequence[nn.Module | None],
    process_group: Any = None,
) -> GradExchange:
    """An exchange of ``strategy`` for these parameters.

    ``models`` is ``(model, ref_model)`` as given to the engine; ``process_group``
    the data-parallel group of ``"dp"`` (FSDP2 uses its mesh's, DeepSpeed its engine's).
    """
    return strategy.build(config, names, theta_params, phi_params, models, process_group)
