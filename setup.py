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
    import re
    import subprocess

    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if not torch.version.cuda or CUDA_HOME is None:
        return False
    # BuildExtension aborts the whole install (not only this optional extension)
    # when nvcc's CUDA major differs from torch's, so check first and fall back
    # to the CPU kernels with a message instead.
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    try:
        version = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"mdgd: {nvcc} does not run ({exc}); building without the CUDA kernels")
        return False
    found = re.search(r"release (\d+)\.", version)
    if found and found.group(1) != torch.version.cuda.split(".")[0]:
        print(
            f"mdgd: nvcc at {nvcc} is CUDA {found.group(1)}.x but torch was built with CUDA "
            f"{torch.version.cuda}; building without the CUDA kernels (point CUDA_HOME at a "
            "toolkit with the same major version to get them)"
        )
        return False
    return True


def _extensions() -> tuple[list, dict]:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("mdgd: torch is not installed; building without the C++ extension")
        return [], {}

    # No -std: cpp_extension adds the one the installed torch needs (C++20 for
    # torch 2.13), the same for the .cpp and .cu files of this one library.
    cxx_flags = ["-O3", "-fopenmp"]
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
        # No -std here: cpp_extension adds the one the installed torch needs
        # (C++20 for torch 2.13, whose headers use C++20 features). No fast-math:
        # segment_combine_ reproduces the torch backend's float32 bits.
        nvcc_flags = ["-O3", "-Xptxas=-warn-spills"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # A100 and H100 SASS, plus sm_90 PTX so newer GPUs JIT instead of
            # failing with "no kernel image". TORCH_CUDA_ARCH_LIST overrides.
            nvcc_flags += [
                "-gencode=arch=compute_80,code=sm_80",
                "-gencode=arch=compute_90,code=sm_90",
                "-gencode=arch=compute_90,code=compute_90",
            ]
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags
        kwargs["define_macros"] = [("MDGD_WITH_CUDA", "1")]
        ext = CUDAExtension("mdgd_kernels._C", sources, **kwargs)
    else:
        ext = CppExtension("mdgd_kernels._C", sources, **kwargs)
    # optional: a failed compile warns instead of failing the install.
    ext.optional = True
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
