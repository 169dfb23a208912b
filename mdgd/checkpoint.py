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
    tensors: dict[str, torch.Tensor] = {}
    for name, p in zip(engine.theta.names, engine.theta.params):
        tensors[f"model/{name}"] = p.detach().cpu().contiguous()
    state: dict[str, Any] = {
        "format": FORMAT,
        "step": engine.step_count,
        "config": engine.config.to_dict(),
        "param_names": list(engine.theta.names),
        "rng": _split(_rng_state(), "rng", tensors),
    }
    for key in ("optimizer", "lr_scheduler", "scaler"):
        obj = getattr(engine, key)
        state[key] = None if obj is None else _split(obj.state_dict(), key, tensors)
    save_file(
        tensors, str(path / TENSORS), metadata={"format": "mdgd", "step": str(engine.step_count)}
    )
    torch.save(state, path / STATE)
    return path


def load_checkpoint(engine, path: str | Path) -> None:
    """Restore what :func:`save_checkpoint` wrote into an engine built like the saved one."""
    path = Path(path)
    state = torch.load(path / STATE, weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path / STATE} has format {state.get('format')!r}, expected {FORMAT}")
    if engine.num_micro_batches:
        raise RuntimeError(
            "load a checkpoint before backward(), not in the middle of an accumulation"
        )
    if state["param_names"] != list(engine.theta.names):
        saved, now = set(state["param_names"]), set(engine.theta.names)
        diff = sorted(saved ^ now)[:3]
        raise ValueError(
            f"the checkpoint trains {len(saved)} parameters, this engine {len(now)}; they "
            f"differ in e.g. {diff}: build the engine with the same trainable patterns"
        )
    if state["config"] != engine.config.to_dict():
        warnings.warn(
            f"the checkpoint was written with {state['config']}, this engine has "
            f"{engine.config.to_dict()}; the resumed run will differ from the saved one",
            stacklevel=2,
        )
    tensors = load_file(str(path / TENSORS))
    with torch.no_grad():
        for name, p in zip(engine.theta.names, engine.theta.params):
            p.copy_(tensors[f"model/{name}"])
    for key in ("optimizer", "lr_scheduler", "scaler"):
        obj, saved = getattr(engine, key), state[key]
        if (obj is None) != (saved is None):
            raise ValueError(
                f"the checkpoint {'has' if saved is not None else 'has no'} {key} state but "
                f"this engine {'has no' if obj is None else 'has a'} {key}"
            )
        if obj is not None:
            obj.load_state_dict(_join(saved, tensors))
    _set_rng_state(_join(state["rng"], tensors))
    engine.step_count = state["step"]
