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

FSDP2 runs (``distributed="fsdp"``) save with ``torch.distributed.checkpoint``
(every rank calls ``save_checkpoint`` / ``load_checkpoint``; no rank gathers the
full model): the directory then holds ``dcp-<generation>/`` (theta's trainable
parameters and the optimizer state, sharded, through ``get_state_dict`` /
``set_state_dict``), ``state.pt`` and ``tensors-<generation>.safetensors`` (written
by rank 0, last: step, config, names, scheduler) and ``rng-<rank>-<generation>.*``
(each rank's RNG states). Resume with the same number of
ranks (the RNG files are per rank); DCP itself can reshard the model and
optimizer state to another world size.
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
DCP_DIR = "dcp"
_MUST_MATCH = ("mode", "granularity")  # config keys a resumed run cannot change


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
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
    if engine.dist_mode == "fsdp":
        return _save_fsdp(engine, path)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in zip(engine.theta.names, engine.theta.params):
        tensors[f"model/{name}"] = p.detach().cpu().contiguous()
    state = _engine_state(engine, tensors, ("optimizer", "lr_scheduler", "scaler"))
    state["rng"] = split_tensors(_rng_state(), "rng", tensors)
    generation = next_generation(path, "state")
    write_generation(path, "tensors", "state", state, tensors, engine.step_count, generation)
    prune(path, "tensors-*.safetensors", f"tensors-{generation}.safetensors")
    prune(path, ".*.tmp-*")  # left by saves that were killed
    return path


def load_checkpoint(engine, path: str | Path) -> None:
    """Restore what :func:`save_checkpoint` wrote into an engine built like the saved one.

    Everything is read and checked first; a :class:`CheckpointError` (or
    ``FileNotFoundError``) leaves the engine untouched.
    """
    path = Path(path)
    if engine.num_micro_batches:
        raise RuntimeError(
            "load a checkpoint before backward(), not in the middle of an accumulation"
        )
    state, tensors = read_verified(path, "state")
    _check_compatible(engine, state, path / STATE)
    if engine.dist_mode == "fsdp":
        keys = ("lr_scheduler", "scaler")
        rng, rng_tensors = read_verified(path, f"{_rng_name()}-{state['generation']}")
        rng = rng["rng"]
    else:
        keys = ("optimizer", "lr_scheduler", "scaler")
        rng, rng_tensors = state["rng"], tensors
    staged = {key: _staged(engine, key, state, tensors, path / STATE) for key in keys}
    rng = join_tensors(rng, rng_tensors)
    # nothing has changed so far; the optimizer checks its groups before it changes
    if engine.dist_mode == "fsdp":
        load_sharded(engine.model, engine.optimizer, path / f"{DCP_DIR}-{state['generation']}")
    for key, obj in staged.items():
        if obj is not None:
            getattr(engine, key).load_state_dict(obj)
    if engine.dist_mode != "fsdp":
        with torch.no_grad():
            for name, p in zip(engine.theta.names, engine.theta.params):
                p.copy_(tensors[f"model/{name}"])
    _set_rng_state(rng)
    engine.step_count = state["step"]


def _staged(engine, key: str, state: dict, tensors: dict, file: Path) -> Any:
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


def _engine_state(engine, tensors: dict[str, torch.Tensor], keys) -> dict[str, Any]:
    state: dict[str, Any] = {
        "format": FORMAT,
        "step": engine.step_count,
        "config": engine.config.to_dict(),
        "param_names": list(engine.theta.names),
        "param_shapes": [list(p.shape) for p in engine.theta.params],
        "segment_sizes": list(engine.segments.sizes),
        "sharded": engine.dist_mode == "fsdp",
    }
    for key in keys:
        obj = getattr(engine, key)
        state[key] = None if obj is None else split_tensors(obj.state_dict(), key, tensors)
    return state


def _check_compatible(engine, state: dict, file: Path) -> None:
    """Raise :class:`CheckpointError` where the checkpoint cannot resume ``engine``."""
    if state["param_names"] != list(engine.theta.names):
        saved, now = set(state["param_names"]), set(engine.theta.names)
        diff = sorted(saved ^ now)[:3]
        raise CheckpointError(
            f"{file} trains {len(saved)} parameters, this engine {len(now)}; they "
            f"differ in e.g. {diff}: build the engine with the same trainable patterns"
        )
    if state.get("sharded", False) != (engine.dist_mode == "fsdp"):
        which = "an FSDP2" if state.get("sharded") else "a non-FSDP2"
        raise CheckpointError(
            f"{file} is {which} checkpoint but this engine runs in {engine.dist_mode!r} mode: "
            "resume in the mode it was saved in"
        )
    config = engine.config.to_dict()
    for key in _MUST_MATCH:
        if state["config"][key] != config[key]:
            raise CheckpointError(
                f"{file} was written with {key}={state['config'][key]!r}, this engine has "
                f"{key}={config[key]!r}: resume with the same {key}"
            )
    if not state["sharded"]:
        _check_layout(engine, state, file)
    if state["config"] != config:
        warnings.warn(
            f"the checkpoint was written with {state['config']}, this engine has "
            f"{config}; the resumed run will differ from the saved one",
            stacklevel=3,
        )


def _check_layout(engine, state: dict, file: Path) -> None:
    for name, saved, p in zip(state["param_names"], state["param_shapes"], engine.theta.params):
        if saved != list(p.shape):
            raise CheckpointError(
                f"{file} has {name} of shape {tuple(saved)}, this engine {tuple(p.shape)}: "
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


# ---------------------------------------------------------------------- FSDP2


def _rng_name() -> str:
    import torch.distributed as dist

    return f"rng-{dist.get_rank()}"


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


def _save_fsdp(engine, path: Path) -> Path:
    """Every rank writes its RNG file and its DCP shard under a new generation's names;
    then rank 0 commits ``state.pt``, and only then are older generations removed."""
    import torch.distributed as dist

    rank = dist.get_rank()
    generation = next_generation(path, "state")  # read by every rank before dcp.save syncs them
    rng_tensors: dict[str, torch.Tensor] = {}
    rng = {"format": FORMAT, "rng": split_tensors(_rng_state(), "rng", rng_tensors)}
    rng_name = f"rng-{rank}-{generation}"
    write_generation(path, rng_name, rng_name, rng, rng_tensors, engine.step_count, generation)
    save_sharded(engine.model, engine.optimizer, path / f"{DCP_DIR}-{generation}")
    dist.barrier()  # every rank's files are complete before the commit
    if rank == 0:
        tensors: dict[str, torch.Tensor] = {}
        state = _engine_state(engine, tensors, ("lr_scheduler", "scaler"))
        write_generation(path, "tensors", "state", state, tensors, engine.step_count, generation)
    dist.barrier()  # committed: older generations can go
    if rank == 0:
        prune(path, f"{DCP_DIR}-*", f"{DCP_DIR}-{generation}")
        prune(path, "tensors-*.safetensors", f"tensors-{generation}.safetensors")
        prune(path, ".*.tmp-*")  # left by saves that were killed
    prune(path, f"rng-{rank}-*", f"{rng_name}.pt", f"{rng_name}-{generation}.safetensors")
    return path
