"""Build the mdgd C++/CUDA extension (``mdgd_kernels._C``).

The CPU kernels are always built. The CUDA kernels are added only when the
installed torch is a CUDA build *and* a CUDA toolkit is found (``CUDA_HOME``);
set ``MDGD_SKIP_CUDA_BUILD=1`` to skip them anyway. ``MAX_JOBS`` is honoured by
ninja. The extension is optional: if it fails to compile, the package still
installs and falls back to the pure-torch path (it says so once at run time).

Install with ``pip install --no-build-isolation -e .`` so that the build uses the
torch you already have (torch is not a build requirement on purpose).
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    if os.environ.get("MDGD_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return False
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return bool(torch.version.cuda) and CUDA_HOME is not None


def _extensions() -> tuple[list, dict]:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("mdgd: torch is not installed; building without the C++ extension")
        return [], {}

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if os.uname().machine in ("x86_64", "AMD64"):
        # Dispatch to AVX2/AVX-512 happens inside ATen's vectorised types at run
        # time only for ATen itself; our kernels are compiled for AVX2+FMA, which
        # every A100/H100 host CPU has. MDGD_NATIVE=0 disables it for old CPUs.
        if os.environ.get("MDGD_NATIVE", "1") != "0":
            cxx_flags += ["-mavx2", "-mfma", "-mf16c"]
    sources = ["csrc/ops.cpp", *_sources("csrc/cpu/*.cpp")]
    kwargs: dict = {
        "extra_compile_args": {"cxx": cxx_flags},
        "extra_link_args": ["-fopenmp"],
        "include_dirs": [os.path.join(ROOT, "csrc")],
    }
    if _want_cuda():
        sources += _sources("csrc/cuda/*.cu")
        kwargs["extra_compile_args"]["nvcc"] = [
            "-O3",
            "-std=c++17",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
        ]
        kwargs["define_macros"] = [("MDGD_WITH_CUDA", "1")]
        ext = CUDAExtension("mdgd_kernels._C", sources, **kwargs)
    else:
        ext = CppExtension("mdgd_kernels._C", sources, **kwargs)
    # optional: a failed compile warns instead of failing the install.
    ext.optional = True
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
