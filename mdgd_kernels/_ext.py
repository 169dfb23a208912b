"""Loading the compiled extension without ever failing at import time.

``mdgd_kernels._C`` registers the CPU (and, when built with CUDA, the CUDA)
kernels of the ``mdgd::`` ops. If it is missing or broken, ``available`` is
False, ``error`` keeps the original exception, and asking for the ``"cpu"`` or
``"cuda"`` backend explicitly re-raises it.

The build writes a record beside the extension (``_C_build.json``, see
setup.py): whether it was built, why not, and the torch version it was built
against. It is read *before* the extension is loaded: a C++ extension built
against another torch can fail with an undefined symbol or crash the process,
so after a torch upgrade the extension is not loaded at all and the error says
to rebuild it. An extension without a record (built by an older setup.py) is
loaded as before.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

RECORD = Path(__file__).with_name("_C_build.json")
REBUILD = (
    "rebuild it against the installed torch (`pip install --no-build-isolation -e .` in a "
    "checkout, `pip install --no-build-isolation --force-reinstall --no-deps <the mdgd sdist>` "
    "otherwise)"
)

available = False
cuda_available = False
error: BaseException | None = None
build: dict | None = None  # the build record, None where there is none


def _read_record() -> dict | None:
    try:
        return json.loads(RECORD.read_text())
    except FileNotFoundError:
        return None


def _load():
    if build is not None:
        if not build["built"]:
            raise ImportError(
                f"mdgd_kernels._C was not built when mdgd was installed: {build['reason']}"
            )
        if build["torch"] != str(torch.__version__):
            raise ImportError(
                f"mdgd_kernels._C was built against torch {build['torch']} but torch "
                f"{torch.__version__} is installed; it was not loaded (an extension built "
                "against another torch can crash the process) and needs a rebuild"
            )
    return importlib.import_module("mdgd_kernels._C")


try:
    build = _read_record()
    _C = _load()
    available = True
    cuda_available = bool(_C.built_with_cuda())
except Exception as exc:  # ImportError, an unreadable record, an undefined symbol
    _C = None
    error = exc


def require(backend: str) -> None:
    """Raise a helpful error if the compiled kernels of ``backend`` are missing."""
    if not available:
        raise RuntimeError(
            f"backend={backend!r} needs the compiled extension mdgd_kernels._C, which did not "
            f"load ({type(error).__name__}: {error}). Use backend='torch', or {REBUILD}."
        ) from error
    if backend == "cuda" and not cuda_available:
        raise RuntimeError(
            "backend='cuda' needs mdgd_kernels._C built with CUDA (a CUDA torch and a CUDA "
            "toolkit at build time, MDGD_SKIP_CUDA_BUILD unset). Use backend='triton' or "
            "'torch' instead."
        )
