"""Checkpoint and resume for :class:`mdgd.MDGDEngine`.

A checkpoint is a directory with two files:

* ``tensors.safetensors``: every tensor: theta's trainable parameters
  (``model/<name>``), the optimizer's state, the scheduler's and scaler's tensors
  and the RNG states;
* ``state.pt``: everything else (step count, config, hyper-parameters, the
  structure of the state dicts, with each tensor replaced by a reference into
  the safetensors file), plain Python objects read back with
  ``torch.load(weights_only=True)``: no pickled code runs on load.

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
full model): the directory then holds ``dcp/`` (theta's trainable parameters and
the optimizer state, sharded, through ``get_state_dict`` / ``set_state_dict``),
``state.*`` (written by rank 0: step, config, names, scheduler) and
``rng-<rank>.*`` (each rank's RNG states). Resume with the same number of
ranks (the RNG files are per rank); DCP itself can reshard the model and
optimizer state to another world size.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = 1
TENSORS = "tensors.safetensors"
STATE = "state.pt"
DCP_DIR = "dcp"
_REF = "__tensor__"


def _split(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` with every tensor moved into ``tensors`` and replaced by ``{_REF: key}``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_REF: key}
    if isinstance(obj, dict):
        return {k: _split(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_REF}:
            return tensors[obj[_REF]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [_join(v, tensors) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


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
    state["rng"] = _split(_rng_state(), "rng", tensors)
    _write(path, "tensors", "state", state, tensors, engine.step_count)
    return path


def load_checkpoint(engine, path: str | Path) -> None:
    """Restore what :func:`save_checkpoint` wrote into an engine built like the saved one."""
    path = Path(path)
    if engine.num_micro_batches:
        raise RuntimeError(
            "load a checkpoint before backward(), not in the middle of an accumulation"
        )
    state, tensors = _read(path, "tensors", "state")
    _check_compatible(engine, state, path)
    if engine.dist_mode == "fsdp":
        load_sharded(engine.model, engine.optimizer, path / DCP_DIR)
        keys = ("lr_scheduler", "scaler")
        rng, rng_tensors = _read(path, _rng_name(), _rng_name())
        rng = rng["rng"]
    else:
        with torch.no_grad():
            for name, p in zip(engine.theta.names, engine.theta.params):
                p.copy_(tensors[f"model/{name}"])
        keys = ("optimizer", "lr_scheduler", "scaler")
        rng, rng_tensors = state["rng"], tensors
    for key in keys:
        obj, saved = getattr(engine, key), state[key]
        if (obj is None) != (saved is None):
            raise ValueError(
                f"the checkpoint {'has' if saved is not None else 'has no'} {key} state but "
                f"this engine {'has no' if obj is None else 'has a'} {key}"
            )
        if obj is not None:
            obj.load_state_dict(_join(saved, tensors))
    _set_rng_state(_join(rng, rng_tensors))
    engine.step_count = state["step"]


# ---------------------------------------------------------------------- pieces


def _engine_state(engine, tensors: dict[str, torch.Tensor], keys) -> dict[str, Any]:
    state: dict[str, Any] = {
        "format": FORMAT,
        "step": engine.step_count,
        "config": engine.config.to_dict(),
        "param_names": list(engine.theta.names),
        "sharded": engine.dist_mode == "fsdp",
    }
    for key in keys:
        obj = getattr(engine, key)
        state[key] = None if obj is None else _split(obj.state_dict(), key, tensors)
    return state


def _write(path: Path, tensors_name: str, state_name: str, state, tensors, step: int) -> None:
    save_file(
        tensors,
        str(path / f"{tensors_name}.safetensors"),
        metadata={"format": "mdgd", "step": str(step)},
    )
    torch.save(state, path / f"{state_name}.pt")


def _read(path: Path, tensors_name: str, state_name: str) -> tuple[dict, dict]:
    file = path / f"{state_name}.pt"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: not an mdgd checkpoint, or one written by more ranks "
            "than this run has (resume FSDP2 runs on the same number of ranks)"
        )
    state = torch.load(file, weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{file} has format {state.get('format')!r}, expected {FORMAT}")
    return state, load_file(str(path / f"{tensors_name}.safetensors"))


def _check_compatible(engine, state: dict, path: Path) -> None:
    if state["param_names"] != list(engine.theta.names):
        saved, now = set(state["param_names"]), set(engine.theta.names)
        diff = sorted(saved ^ now)[:3]
        raise ValueError(
            f"the checkpoint trains {len(saved)} parameters, this engine {len(now)}; they "
            f"differ in e.g. {diff}: build the engine with the same trainable patterns"
        )
    if state.get("sharded", False) != (engine.dist_mode == "fsdp"):
        which = "an FSDP2" if state.get("sharded") else "a non-FSDP2"
        raise ValueError(
            f"{path} is {which} checkpoint but this engine runs in {engine.dist_mode!r} mode: "
            "resume in the mode it was saved in"
        )
    if state["config"] != engine.config.to_dict():
        warnings.warn(
            f"the checkpoint was written with {state['config']}, this engine has "
            f"{engine.config.to_dict()}; the resumed run will differ from the saved one",
            stacklevel=3,
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
    import torch.distributed as dist

    save_sharded(engine.model, engine.optimizer, path / DCP_DIR)
    if dist.get_rank() == 0:
        tensors: dict[str, torch.Tensor] = {}
        state = _engine_state(engine, tensors, ("lr_scheduler", "scaler"))
        _write(path, "tensors", "state", state, tensors, engine.step_count)
    rng_tensors: dict[str, torch.Tensor] = {}
    rng = {"format": FORMAT, "rng": _split(_rng_state(), "rng", rng_tensors)}
    _write(path, _rng_name(), _rng_name(), rng, rng_tensors, engine.step_count)
    dist.barrier()  # every file is written before anyone reads them
    return path
