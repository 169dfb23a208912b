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

from ..checkpoint import STATE, CheckpointError, load_per_rank, save_per_rank

DS_DIR = "deepspeed"


def _tag(generation: int) -> str:
    return f"gen-{generation}"


def save_deepspeed(engine, ds_engine: Any, path: Path) -> Path:
    def write_shards(generation: int) -> Path:
        ds_engine.save_checkpoint(str(path / DS_DIR), tag=_tag(generation), save_latest=False)
        return path / DS_DIR / _tag(generation)

    return save_per_rank(engine, path, write_shards, ())


def load_deepspeed(engine, ds_engine: Any, path: Path) -> None:
    def load_shards(generation: int) -> None:
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

    load_per_rank(engine, path, load_shards, ())
