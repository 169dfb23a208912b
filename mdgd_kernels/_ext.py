"""Loading the compiled extension without ever failing at import time.

``mdgd_kernels._C`` registers the CPU (and, when built with CUDA, the CUDA)
kernels of the ``mdgd::`` ops. If it is missing or broken, ``available`` is
False, ``error`` keeps the original exception, and asking for the ``"cpu"`` or
``"cuda"`` backend explicitly re-raises it.
"""

from __future__ import annotations

import importlib

available = False
cuda_available = False
error: BaseException | None = None

try:
    _C = importlib.import_module("mdgd_kernels._C")
    available = True
    cuda_available = bool(_C.built_with_cuda())
except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
    _C = None
    error = exc


def require(backend: str) -> None:
    """Raise a helpful error if the compiled kernels of ``backend`` are missing."""
    if not available:
        raise RuntimeError(
            f"backend={backend!r} needs the compiled extension mdgd_kernels._C, which did not "
            f"load ({type(error).__name__}: {error}). Rebuild it with "
            "`pip install --no-build-isolation -e .`, or use backend='torch'."
        ) from error
    if backend == "cuda" and not cuda_available:
        raise RuntimeError(
            "backend='cuda' needs mdgd_kernels._C built with CUDA (a CUDA torch and a CUDA "
            "toolkit at build time, MDGD_SKIP_CUDA_BUILD unset). Use backend='triton' or "
            "'torch' instead."
        )
