"""Checkpoint and resume for :class:`mdgd.MDGDEngine`.

A checkpoint is a directory with two files:

* ``tensors-<generation>.safetensors``: every tensor: theta's trainable parameters
  (``model/<name>``), the optimizer's state, the scheduler's and scaler's tensors
  and the RNG states;
* ``state.pt``: everything else (step count, config, segment layout, the
  structure of the state dicts, with each tensor replaced by a reference into
  the safetensors file, that file's name, size and SHA-256, and its own), plain Python
  objects read back with ``torch.load(weights_only=True)``: no pickled code runs
  on load.

Saves are atomic: every file is written under a temporary name, flushed to disk
(``fsync``) and renamed into place, and ``state.pt`` is renamed last: it is the
commit point. A save killed at any moment leaves the previous checkpoint in the
directory complete and loadable (the new tensors file is only referenced once the
new ``state.pt`` is in place; the old one is removed after that). A load checks
everything before it changes anything: a truncated or corrupted file, or a
checkpoint of another trainable set, segment layout or mode, raises
:class:`CheckpointError` naming the file and the mismatch, and leaves the engine
as it was. The file handling (atomic writes, generations, verified reads) is
:mod:`mdgd.checkpoint_files`.

Saved: theta's *trainable* parameters (MDGD never changes the others), the
optimizer, the scheduler and the GradScaler given to the engine, the CPU (and
CUDA) RNG states of torch, Python's ``random`` and NumPy's global RNG, and the
step count. Not saved: the frozen parameters of theta and the reference model;
rebuild both from the pre-trained weights, then load. Save at step boundaries
only (not between ``backward`` calls of an accumulation).

A run stopped after a step and resumed from its checkpoint continues exactly
as the uninterrupted run, provided the data order is resumed too (the engine
does not own the data loader; ``engine.step_count`` tells where it was).

That is the format of one process and of ``"dp"`` (every rank holds the same
state; rank 0's is what a resumed run needs). A strategy whose ranks hold
shards writes its own files (the engine's exchange decides:
``GradExchange.save_checkpoint``): FSDP2 through ``torch.distributed.checkpoint``
(:mod:`mdgd.distributed.fsdp_checkpoint`), DeepSpeed through the engine's own
``save_checkpoint`` (:mod:`mdgd.distributed.deepspeed`); both keep ``state.pt``
as the commit point and use the helpers here. Every rank then calls
``save_checkpoint`` / ``load_checkpoint``.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import torch

from .checkpoint_files import (
    FORMAT,
    CheckpointError,
    join_tensors,
    next_generation,
    prune,
    read_verified,
    split_tensors,
    write_generation,
)

STATE = "state.pt"
_MUST_MATCH = ("mode", "granularity")  # config keys a resumed run cannot change


def rng_state() -> dict[str, Any]:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, path: str | Path) -> Path:
    """Write ``engine``'s training state to the directory ``path`` (created if needed)."""
    if engine.num_micro_batches:
        raise RuntimeError(
            f"{engine.num_micro_batches} micro-batch(es) are accumulated but not stepped; "
            "save a checkpoint after step(), not in the middle of an accumulation"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return engine.exchange.save_checkpoint(engine, path)


def load_checkpoint(engine, path: str | Path) -> None:
    """Restore what :func:`save_checkpoint` wrote into an engine built like the saved one.

    Everything is read and checked first; a :class:`CheckpointError` (or
    ``FileNotFoundError``) leaves the engine untouched.
    """
    if engine.num_micro_batches:
        raise RuntimeError(
            "load a checkpoint before backward(), not in the middle of an accumulation"
        )
    engine.exchange.load_checkpoint(engine, Path(path))


def save_full(engine, path: Path) -> Path:
    """The one-process format (module doc): every tensor in one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    for name, p in zip(engine.theta.names, engine.theta.params):
        tensors[f"model/{name}"] = p.detach().cpu().contiguous()
    state = engine_state(engine, tensors, ("optimizer", "lr_scheduler", "scaler"))
    state["rng"] = split_tensors(rng_state(), "rng", tensors)
    generation = next_generation(path, "state")
    write_generation(path, "tensors", "state", state, tensors, engine.step_count, generation)
    prune(path, "tensors-*.safetensors", f"tensors-{generation}.safetensors")
    prune(path, ".*.tmp-*")  # left by saves that were killed
    return path


def load_full(engine, path: Path) -> None:
    """Load what :func:`save_full` wrote (checked first, then applied)."""
    state, tensors = read_checked(engine, path)
    keys = ("optimizer", "lr_scheduler", "scaler")
    staged = {key: stage(engine, key, state, tensors, path / STATE) for key in keys}
    rng = join_tensors(state["rng"], tensors)
    # nothing has changed so far; the optimizer checks its groups before it changes
    apply_staged(engine, staged)
    with torch.no_grad():
        for name, p in zip(engine.theta.names, engine.theta.params):
            p.copy_(tensors[f"model/{name}"])
    set_rng_state(rng)
    engine.step_count = state["step"]


def read_checked(engine, path: Path) -> tuple[dict, dict]:
    """``state.pt`` and its tensors, verified and checked against ``engine``."""
    state, tensors = read_verified(path, "state")
    check_compatible(engine, state, path / STATE)
    return state, tensors


def apply_staged(engine, staged: dict[str, Any]) -> None:
    for key, obj in staged.items():
        if obj is not None:
            getattr(engine, key).load_state_dict(obj)


def stage(engine, key: str, state: dict, tensors: dict, file: Path) -> Any:
    """The saved state dict of ``engine.<key>``, its tensors joined in (None if absent)."""
    obj, saved = getattr(engine, key), state[key]
    if (obj is None) != (saved is None):
        raise CheckpointError(
            f"{file} {'has' if saved is not None else 'has no'} {key} state but "
            f"this engine {'has no' if obj is None else 'has a'} {key}"
        )
    try:
        return None if saved is None else join_tensors(saved, tensors)
    except KeyError as exc:
        raise CheckpointError(f"{file} refers to tensor {exc} that its tensors file lacks") from exc


def engine_state(engine, tensors: dict[str, torch.Tensor], keys) -> dict[str, Any]:
    state: dict[str, Any] = {
        "format": FORMAT,
        "step": engine.step_count,
        "config": engine.config.to_dict(),
        "param_names": list(engine.theta.names),
        "param_shapes": [list(shape) for shape in engine.exchange.shapes],
        "segment_sizes": list(engine.segments.sizes),
        "layout": engine.exchange.checkpoint_format,
    }
    for key in keys:
        obj = getattr(engine, key)
        state[key] = None if obj is None else split_tensors(obj.state_dict(), key, tensors)
    return state


def _saved_format(state: dict) -> str:
    """The checkpoint's format (files before "layout" existed said "sharded")."""
    if "layout" in state:
        return state["layout"]
    return "fsdp-dcp" if state.get("sharded") else "full"


def check_compatible(engine, state: dict, file: Path) -> None:
    """Raise :class:`CheckpointError` where the checkpoint cannot resume ``engine``."""
    if state["param_names"] != list(engine.theta.names):
        saved, now = set(state["param_names"]), set(engine.theta.names)
        diff = sorted(saved ^ now)[:3]
        raise CheckpointError(
            f"{file} trains {len(saved)} parameters, this engine {len(now)}; they "
            f"differ in e.g. {diff}: build the engine with the same trainable patterns"
        )
    saved_format, now = _saved_format(state), engine.exchange.checkpoint_format
    if saved_format != now:
        raise CheckpointError(
            f"{file} is a {saved_format!r} checkpoint but this engine runs in "
            f"{engine.distributed!r} mode, which writes {now!r} ones: resume in the mode "
            "it was saved in"
        )
    config = engine.config.to_dict()
    for key in _MUST_MATCH:
        if state["config"][key] != config[key]:
            raise CheckpointError(
                f"{file} was written with {key}={state['config'][key]!r}, this engine has "
                f"{key}={config[key]!r}: resume with the same {key}"
            )
    _check_layout(engine, state, file)
    if state["config"] != config:
        warnings.warn(
            f"the checkpoint was written with {state['config']}, this engine has "
            f"{config}; the resumed run will differ from the saved one",
            stacklevel=3,
        )


def _check_layout(engine, state: dict, file: Path) -> None:
    shapes = engine.exchange.shapes
    for name, saved, shape in zip(state["param_names"], state["param_shapes"], shapes):
        if saved != list(shape):
            raise CheckpointError(
                f"{file} has {name} of shape {tuple(saved)}, this engine {tuple(shape)}: "
                "build the model from the same configuration"
            )
    saved, now = state["segment_sizes"], list(engine.segments.sizes)
    if saved != now:
        at = next(
            (i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now))
        )
        raise CheckpointError(
            f"{file} has a layout of {len(saved)} segments, this engine {len(now)}; they first "
            f"differ at segment {at}: resume with the same granularity and trainable set"
        )


# ---------------------------------------------------------------------- per-rank shards


def save_per_rank(engine, path: Path, write_shards, keys: tuple[str, ...]) -> Path:
    """The commit protocol of a strategy whose ranks each hold shards (every rank calls it).

    Every rank writes its RNG file and, through ``write_shards(generation)`` (a collective
    of the wrapper's, returning the directory it wrote), its shards under a new
    generation's names; then rank 0 commits ``state.pt`` (with ``keys`` of the engine),
    and only then are older generations removed: the shard directory's siblings named
    like it (``<prefix>-<generation>``), the tensors files, and each rank's RNG files.
    """
    import torch.distributed as dist

    rank = dist.get_rank()
    generation = next_generation(path, "state")  # read by every rank before the shards sync
    rng_tensors: dict[str, torch.Tensor] = {}
    rng = {"format": FORMAT, "rng": split_tensors(rng_state(), "rng", rng_tensors)}
    rng_name = f"rng-{rank}-{generation}"
    write_generation(path, rng_name, rng_name, rng, rng_tensors, engine.step_count, generation)
    shards = write_shards(generation)
    dist.barrier()  # every rank's files are complete before the commit
    if rank == 0:
        tensors: dict[str, torch.Tensor] = {}
        state = engine_state(engine, tensors, keys)
        write_generation(path, "tensors", "state", state, tensors, engine.step_count, generation)
    dist.barrier()  # committed: older generations can go
    if rank == 0:
        prefix = shards.name.rsplit("-", 1)[0]
        prune(shards.parent, f"{prefix}-*", shards.name)
        prune(path, "tensors-*.safetensors", f"tensors-{generation}.safetensors")
        prune(path, ".*.tmp-*")  # left by saves that were killed
    prune(path, f"rng-{rank}-*", f"{rng_name}.pt", f"{rng_name}-{generation}.safetensors")
    return path


def load_per_rank(engine, path: Path, load_shards, keys: tuple[str, ...]) -> None:
    """Load what :func:`save_per_rank` wrote: ``state.pt``, this rank's RNG file and the
    engine's ``keys`` are read and checked before ``load_shards(generation)`` changes
    anything."""
    import torch.distributed as dist

    state, tensors = read_checked(engine, path)
    generation = state["generation"]
    rng, rng_tensors = read_verified(path, f"rng-{dist.get_rank()}-{generation}")
    staged = {key: stage(engine, key, state, tensors, path / STATE) for key in keys}
    rng = join_tensors(rng["rng"], rng_tensors)
    load_shards(generation)
    apply_staged(engine, staged)
    set_rng_state(rng)
    engine.step_count = state["step"]
