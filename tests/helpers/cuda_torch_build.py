"""Run setup.py as if the installed torch were a CUDA build (used by tests/test_setup.py).

    python tests/helpers/cuda_torch_build.py CUDA_VERSION [setup.py arguments ...]

Run it from the source tree to build (the folder holding setup.py). It sets what a
CUDA torch differs in, for torch.utils.cpp_extension, before setup.py runs:
``torch.version.cuda`` (the CUDA version torch was built with),
``torch.cuda._is_compiled`` (cpp_extension looks for a toolkit only then) and
``torch.cuda.is_available`` (False: a build machine without a GPU). Nothing else is
simulated: the toolkit is whatever CUDA_HOME, CUDA_PATH or PATH give, nvcc, the host
compiler and the linker run for real, and what builds is setup.py's own doing.
"""

from __future__ import annotations

import runpy
import sys

import torch


def main() -> None:
    cuda_version, *setup_args = sys.argv[1:]
    torch.version.cuda = cuda_version
    # private torch API, patched here only (never by setup.py): cpp_extension reads it
    # once, at import, to decide whether to look for a CUDA toolkit at all
    torch.cuda._is_compiled = lambda: True
    torch.cuda.is_available = lambda: False
    sys.argv = ["setup.py", *setup_args]
    runpy.run_path("setup.py", run_name="__main__")


if __name__ == "__main__":
    main()
