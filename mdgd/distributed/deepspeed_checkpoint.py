"""Checkpoints of DeepSpeed runs (``distributed="deepspeed"``).

Every rank calls ``save_checkpoint`` / ``load_checkpoint``. theta's engine
writes its own checkpoint (its partitions of the model, the optimizer and the
scheduler, and DeepSpeed's counters) with ``engine.save_checkpoint`` under
``deepspeed/gen-<generation>/``; each rank writes its RNG states
(``rng-<rank>-<generation>.*``); then rank 0 commits ``state.pt`` (step, config,
names, segment layout) and only then are older generations removed, as in
:mod:`mdgd.checkpoint`. phi is not saved: rebuild it from the pre-trained
weights. Resume with the same number of ranks (the RNG files are per rank).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..checkpoint import (
    STATE,
    CheckpointError,
    engine_state,
    read_checked,
    rng_state,
    set_rng_state,
)
from ..checkpoint_files import (
    FORMAT,
    join_tensors,
    next_generation,
    prune,
    read_verified,
    split_tensors,
    write_generation,
)

DS_DIR = "deepspeed"


def _tag(generation: int) -> str:
    return f"gen-{generation}"


def save_deepspeed(engine, ds_engine: Any, path: Path) -> Path:
    rank = dist.get_rank()
    generation = next_generation(path, "state")  # read by every rank before the engine syncs
    rng_tensors: dict[str, torch.Tensor] = {}
    rng = {"format": FORMAT, "rng": split_tensors(rng_state(), "rng", rng_tensors)}
    rng_name = f"rng-{rank}-{generation}"
    write_generation(path, rng_name, rng_name, rng, rng_tensors, engine.step_count, generation)
    ds_engine.save_checkpoint(str(path / DS_DIR), tag=_tag(generation), save_latest=False)
    dist.barrier()  # every rank's files are complete before the commit
    if rank == 0:
        tensors: dict[str, torch.Tensor] = {}
        state = engine_state(engine, tensors, ())
        write_generation(path, "tensors", "state", state, tensors, engine.step_count, generation)
    dist.barrier()  # committed: older generations can go
    if rank == 0:
        prune(path / DS_DIR, "gen-*", _tag(generation))
        prune(path, "tensors-*.safetensors", f"tensors-{generation}.safetensors")
        prune(path, ".*.tmp-*")  # left by saves that were killed
    prune(path, f"rng-{rank}-*", f"{rng_name}.pt", f"{rng_name}-{generation}.safetensors")
    return path


def load_deepspeed(engine, ds_engine: Any, path: Path) -> None:
    state, _ = read_checked(engine, path)
    generation = state["generation"]
    rng, rng_tensors = read_verified(path, f"rng-{dist.get_rank()}-{generation}")
    rng = join_tensors(rng["rng"], rng_tensors)
    where = path / DS_DIR / _tag(generation)
    if not where.is_dir():
        raise CheckpointError(f"{path / STATE} names DeepSpeed's {where}, which is missing")
    loaded, _ = ds_engine.load_checkpoint(
        str(path / DS_DIR),
        tag=_tag(generation),
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load its checkpoint from {where}")
    set_rng_state(rng)
    engine.step_count = state["step"]
