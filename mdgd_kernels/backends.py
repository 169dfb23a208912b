"""Which backend runs the two passes: what is available, and the automatic choice.

``"triton"`` and ``"cuda"`` run on CUDA tensors (Triton also on CPU tensors under
``TRITON_INTERPRET=1``; ``"cuda"`` is the compiled ``mdgd_kernels._C_cuda``), ``"cpu"``
is the compiled ``mdgd_kernels._C`` and ``"torch"`` the composed-torch ops, on any
device. ``backend=None`` picks the best available one for the tensors' device;
``MDGD_BACKEND`` overrides that choice.
"""

from __future__ import annotations

import os

import torch

from . import _ext

BACKENDS = ("triton", "cuda", "cpu", "torch")


def triton_module():
    from . import triton as triton_backend  # imports triton lazily

    return triton_backend


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    names = []
    if device.type == "cuda" or _triton_interpret():
        try:
            if triton_module().available:
                names.append("triton")
        except ImportError:
            pass
    if device.type == "cuda" and _ext.cuda_available:
        names.append("cuda")
    if device.type == "cpu" and _ext.available:
        names.append("cpu")
    names.append("torch")
    return names


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that runs for tensors on ``device`` (explicit, env var, or automatic).

    Without the compiled CPU kernels the automatic choice on CPU is ``"torch"``;
    ``import mdgd_kernels`` has already warned about it, once (``_ext``).
    """
    name = backend or os.environ.get("MDGD_BACKEND") or None
    if name is None:
        if device.type == "cuda":
            for cand in ("triton", "cuda"):
                if cand in available_backends(device):
                    return cand
            return "torch"
        if device.type == "cpu" and _ext.available:
            return "cpu"
        return "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    if name == "cpu":
        _ext.require("cpu")
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
    elif name == "cuda":
        _ext.require("cuda")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device}")
    elif name == "triton":
        mod = triton_module()
        if not mod.available:
            raise RuntimeError(f"backend='triton' is unavailable: {mod.error}") from mod.error
        if device.type != "cuda" and not (device.type == "cpu" and _triton_interpret()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), "
                f"got tensors on {device}"
            )
    return name


def kernels(name: str):
    """The ``(segment_gram, segment_combine_)`` callables of backend ``name``."""
    if name == "torch":
        return torch.ops.mdgd.segment_gram_torch, torch.ops.mdgd.segment_combine_torch_
    if name == "triton":
        mod = triton_module()
        return mod.segment_gram, mod.segment_combine_
    return torch.ops.mdgd.segment_gram, torch.ops.mdgd.segment_combine_
