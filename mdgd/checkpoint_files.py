"""The files of an mdgd checkpoint: atomic writes, generations and verified reads.

Nothing here knows about engines (:mod:`mdgd.checkpoint` decides what goes in a
checkpoint). A checkpoint generation is a safetensors file of tensors plus a
``<name>.pt`` of plain Python objects that names that file with its size and
SHA-256 and carries its own digest. Every file is written under a temporary name,
fsynced and renamed into place; the ``.pt`` file is renamed last and is the
commit point. :func:`read_verified` checks the format, sizes and digests before
it returns anything.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT = 2
_REF = "__tensor__"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted, or does not fit this engine."""


def split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` with every tensor moved into ``tensors`` and replaced by ``{_REF: key}``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_REF: key}
    if isinstance(obj, dict):
        return {k: split_tensors(v, f"{prefix}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [split_tensors(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_REF}:
            return tensors[obj[_REF]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [join_tensors(v, tensors) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    return obj


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(file: Path, write) -> None:
    """``write(tmp)`` then fsync and rename ``tmp`` to ``file``: ``file`` is either the
    old content or the complete new one, whenever the process dies."""
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(file.parent)


def sha256_file(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def next_generation(path: Path, state_name: str) -> int:
    """One more than the generation of the checkpoint in ``path`` (0 if none)."""
    try:
        return int(torch.load(path / f"{state_name}.pt", weights_only=True)["generation"]) + 1
    except Exception:  # absent, unreadable or of another format: start afresh
        return 0


def write_generation(
    path: Path, tensors_name: str, state_name: str, state, tensors, step: int, generation: int
) -> None:
    """Write ``tensors`` to generation ``generation``'s file, then commit ``state`` (with
    that file's name, size and hash) to ``state_name.pt``."""
    file = path / f"{tensors_name}-{generation}.safetensors"
    metadata = {"format": "mdgd", "step": str(step)}
    atomic_write(file, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    state = dict(state, generation=generation, tensors_file=file.name)
    state["tensors_bytes"], state["tensors_sha256"] = file.stat().st_size, sha256_file(file)
    state["state_sha256"] = state_digest(state)
    atomic_write(path / f"{state_name}.pt", lambda tmp: torch.save(state, tmp))


def state_digest(state: dict) -> str:
    """SHA-256 of the state's ``repr``: plain Python values (its tensors live in the
    safetensors file), so the ``repr`` of what ``torch.load`` returns is the same."""
    body = {k: v for k, v in state.items() if k != "state_sha256"}
    return hashlib.sha256(repr(body).encode()).hexdigest()


def prune(path: Path, pattern: str, *keep: str) -> None:
    """Remove the files (or directories) of older generations, after a commit."""
    for old in path.glob(pattern):
        if old.name not in keep:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)


def read_verified(path: Path, state_name: str) -> tuple[dict, dict]:
    """The state and tensors of a checkpoint, verified (format, size, SHA-256)."""
    file = path / f"{state_name}.pt"
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} does not exist: not an mdgd checkpoint, or one written by more ranks "
            "than this run has (resume FSDP2 runs on the same number of ranks)"
        )
    try:
        state = torch.load(file, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file} is truncated or corrupted: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{file} has format {found!r}, expected {FORMAT}")
    if state.get("state_sha256") != state_digest(state):
        raise CheckpointError(f"{file} is corrupted: its content does not match its SHA-256")
    data = path / state["tensors_file"]
    if not data.is_file():
        raise CheckpointError(f"{data}, which {file} names, does not exist")
    size = data.stat().st_size
    if size != state["tensors_bytes"] or sha256_file(data) != state["tensors_sha256"]:
        raise CheckpointError(
            f"{data} is truncated or corrupted: {size:,} bytes, expected "
            f"{state['tensors_bytes']:,} with SHA-256 {state['tensors_sha256']}"
        )
    try:
        return state, load_file(str(data))
    except Exception as exc:
        raise CheckpointError(f"{data} is corrupted: {exc}") from exc
