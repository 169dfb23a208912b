"""Loading the compiled kernels without ever failing at import time.

Two extension modules, loaded independently (setup.py builds them apart):
``mdgd_kernels._C`` registers the CPU kernels of the ``mdgd::`` ops,
``mdgd_kernels._C_cuda`` the CUDA ones. If one is missing or broken, its flag
(``available``, ``cuda_available``) is False, its error (``error``,
``cuda_error``) keeps the original exception, and asking for its backend
(``"cpu"``, ``"cuda"``) explicitly re-raises it. A missing CPU part warns once,
here, at import; a missing CUDA part is silent (backend=None then picks Triton or
torch on CUDA tensors) and ``python -m mdgd_kernels.info`` says why. Loading a
part never initialises CUDA.

The build writes a record beside the extensions (``_C_build.json``, see
setup.py): the torch they were built against and, per part, whether it was built
and why not. It is read *before* a part is loaded: a C++ extension built against
another torch can fail with an undefined symbol or crash the process, so after a
torch upgrade nothing is loaded and the error says to rebuild. Without a record
(nothing built in this checkout yet) each part is tried as it is.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from types import ModuleType

import torch

RECORD = Path(__file__).with_name("_C_build.json")
CPU_PART, CUDA_PART = "_C", "_C_cuda"  # as setup.py names them
REBUILD = (
    "rebuild it against the installed torch (`pip install --no-build-isolation -e .` in a "
    "checkout, `pip install --no-build-isolation --force-reinstall --no-deps <the mdgd sdist>` "
    "otherwise)"
)


def _read_record() -> dict | None:
    try:
        return json.loads(RECORD.read_text())
    except FileNotFoundError:
        return None


def _load(name: str, record: dict | None) -> ModuleType:
    """Import ``mdgd_kernels.<name>`` unless the build record says it must not be."""
    if record is not None:
        part = record.get("parts", {}).get(name)
        if part is None:
            raise ImportError(
                f"the build record {RECORD} says nothing of mdgd_kernels.{name} (it was written "
                "by an older setup.py); the part was not loaded and needs a rebuild"
            )
        if not part["built"]:
            raise ImportError(
                f"mdgd_kernels.{name} was not built when mdgd was installed: {part['reason']}"
            )
        if record["torch"] != str(torch.__version__):
            raise ImportError(
                f"mdgd_kernels.{name} was built against torch {record['torch']} but torch "
                f"{torch.__version__} is installed; it was not loaded (an extension built "
                "against another torch can crash the process) and needs a rebuild"
            )
    return importlib.import_module(f"mdgd_kernels.{name}")


def _try_load(name: str, record: dict | None) -> tuple[ModuleType | None, BaseException | None]:
    try:
        return _load(name, record), None
    except Exception as exc:  # ImportError, a malformed record, an undefined symbol
        return None, exc


build: dict | None = None  # the build record, None where there is none
try:
    build = _read_record()
except (OSError, ValueError) as exc:  # unreadable or not JSON: load nothing
    _C, error = None, exc
    _C_cuda, cuda_error = None, exc
else:
    _C, error = _try_load(CPU_PART, build)
    _C_cuda, cuda_error = _try_load(CUDA_PART, build)
available = _C is not None  # the CPU kernels are registered
cuda_available = _C_cuda is not None  # the CUDA kernels are registered

if not available:
    warnings.warn(
        f"mdgd: the compiled CPU kernels (mdgd_kernels._C) did not load ({error}); falling "
        f"back to the slower composed-torch backend. To get them, {REBUILD}.",
        RuntimeWarning,
        stacklevel=1,  # raised while importing: no caller of ours to point at
    )


def require(backend: str) -> None:
    """Raise a helpful error if the compiled kernels of ``backend`` are missing."""
    if backend == "cpu" and not available:
        raise RuntimeError(
            f"backend='cpu' needs the compiled CPU kernels (mdgd_kernels._C), which did not "
            f"load ({type(error).__name__}: {error}). Use backend='torch', or {REBUILD}."
        ) from error
    if backend == "cuda" and not cuda_available:
        raise RuntimeError(
            "backend='cuda' needs the compiled CUDA kernels (mdgd_kernels._C_cuda: a CUDA torch "
            "and a CUDA toolkit at build time, MDGD_SKIP_CUDA_BUILD unset), which did not load "
            f"({type(cuda_error).__name__}: {cuda_error}). Use backend='triton' or 'torch' "
            "instead."
        ) from cuda_error
