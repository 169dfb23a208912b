"""Checkpoints of FSDP2 runs (``distributed="fsdp"``), through ``torch.distributed.checkpoint``.

Every rank calls ``save_checkpoint`` / ``load_checkpoint``; no rank gathers the
full model. The directory holds ``dcp-<generation>/`` (theta's trainable
parameters and the optimizer state, sharded, through ``get_state_dict`` /
``set_state_dict``), ``state.pt`` and ``tensors-<generation>.safetensors`` (written
by rank 0, last: step, config, names, scheduler) and ``rng-<rank>-<generation>.*``
(each rank's RNG states). Resume with the same number of ranks (the RNG files
are per rank); DCP itself can reshard the model and optimizer state to another
world size. The commit protocol and file handling are :mod:`mdgd.checkpoint`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoint import load_per_rank, save_per_rank

DCP_DIR = "dcp"


def _dcp_state(model, optimizer) -> tuple[dict, dict, Any]:
    """The trainable parameters and the optimizer state, sharded, as DCP sees them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    if optimizer is None:
        raise ValueError(
            "an FSDP2 checkpoint saves the optimizer with the model: give the engine its optimizer"
        )
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return model_sd, optim_sd, options


def save_sharded(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | Path
) -> None:
    """Save an FSDP2 model's trainable parameters and its optimizer's state with
    ``torch.distributed.checkpoint`` into the directory ``path`` (every rank calls it)."""
    import torch.distributed.checkpoint as dcp

    model_sd, optim_sd, _ = _dcp_state(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str | Path
) -> None:
    """Load what :func:`save_sharded` wrote (every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, optim_sd, options = _dcp_state(model, optimizer)
    want = set(model_sd)
    # parameters MDGD-GM never selected have no optimizer state in the checkpoint: leave
    # them without state (get_state_dict's template initialises every parameter's)
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    prefixes = {key.rsplit(".", 1)[0] for key in saved if key.startswith("optim.state.")}
    optim_sd["state"] = {
        fqn: st for fqn, st in optim_sd["state"].items() if f"optim.state.{fqn}" in prefixes
    }
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(path))
    result = set_state_dict(
        model,
        optimizer,
        model_state_dict=loaded["model"],
        optim_state_dict=loaded["optim"],
        options=options,
    )
    missing = want & set(result.missing_keys)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} parameter(s), e.g. {min(missing)}")


def save_fsdp(engine, path: Path) -> Path:
    """Every rank writes its DCP shard under a new generation's name
    (:func:`mdgd.checkpoint.save_per_rank` commits and prunes)."""

    def write_shards(generation: int) -> Path:
        shards = path / f"{DCP_DIR}-{generation}"
        save_sharded(engine.model, engine.optimizer, shards)
        return shards

    return save_per_rank(engine, path, write_shards, ("lr_scheduler", "scaler"))


def load_fsdp(engine, path: Path) -> None:
    """Load what :func:`save_fsdp` wrote: everything is read and checked before anything
    changes."""

    def load_shards(generation: int) -> None:
        load_sharded(engine.model, engine.optimizer, path / f"{DCP_DIR}-{generation}")

    load_per_rank(engine, path, load_shards, ("lr_scheduler", "scaler"))
