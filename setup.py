"""Build the mdgd C++/CUDA extension (``mdgd_kernels._C``).

The CPU kernels are always built. The CUDA kernels are added only when the
installed torch is a CUDA build *and* a CUDA toolkit is found (``CUDA_HOME``);
set ``MDGD_SKIP_CUDA_BUILD=1`` to skip them anyway. ``MAX_JOBS`` is honoured by
ninja.

The extension is optional. If it fails to build (no compiler, a broken
toolchain, a header problem), the package still installs, says why here
(``pip install -v`` shows it), and ``import mdgd_kernels`` falls back to the
composed-torch backend with one warning. ``MDGD_SKIP_EXT=1`` skips it on
purpose. Either way the build writes ``mdgd_kernels/_C_build.json`` beside the
extension: whether it was built, why not, the torch it was built against and the
CUDA architectures. ``mdgd_kernels._ext`` reads it before loading the extension,
so an extension built against another torch (an ABI mismatch) is never loaded.

Install with ``pip install --no-build-isolation`` (``-e .`` in a checkout) so that
the build uses the torch you already have (torch is not a build requirement on
purpose: pip would fetch a CUDA build of it into the isolated build environment).
The sdist holds every file under csrc/ (MANIFEST.in), whatever machine made it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "mdgd_kernels"
BUILD_RECORD = "_C_build.json"  # read by mdgd_kernels/_ext.py: keep the two in sync
# A100 and H100 SASS, plus sm_90 PTX so newer GPUs JIT instead of failing with
# "no kernel image". TORCH_CUDA_ARCH_LIST overrides.
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _switch(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _say(*lines: str) -> None:
    print("\n".join(f"mdgd: {line}" for line in lines), file=sys.stderr, flush=True)


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    if _switch("MDGD_SKIP_CUDA_BUILD"):
        return False
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
        _say(f"{nvcc} does not run ({exc}); building without the CUDA kernels")
        return False
    found = re.search(r"release (\d+)\.", version)
    if found and found.group(1) != torch.version.cuda.split(".")[0]:
        _say(
            f"nvcc at {nvcc} is CUDA {found.group(1)}.x but torch was built with CUDA "
            f"{torch.version.cuda}; building without the CUDA kernels (point CUDA_HOME at a "
            "toolkit with the same major version to get them)"
        )
        return False
    return True


def _cuda_archs() -> str:
    """The CUDA architectures the build compiles for, as the build record states them."""
    # ",code=": a bare "code=" first matches inside "-gencode=arch" ("arch arch arch")
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or " ".join(
        re.search(r",code=(\w+)", flag).group(1) for flag in GENCODE
    )


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class OptionalBuildExtension(BuildExtension):
        """``BuildExtension`` that never fails the install and records what it built."""

        def build_extensions(self) -> None:
            reason = "MDGD_SKIP_EXT=1 was set" if _switch("MDGD_SKIP_EXT") else None
            if reason is None:
                try:
                    super().build_extensions()
                except Exception as exc:  # any compiler, linker or toolchain failure
                    reason = f"the build failed: {type(exc).__name__}: {exc}".strip()
                    _say(
                        f"the C++ extension {PACKAGE}._C was NOT built ({reason}); the build "
                        "log above says more.",
                        "installing without it: the ops run on the slower composed-torch "
                        "backend. Fix the toolchain and reinstall to get the compiled kernels.",
                    )
            else:
                _say(f"skipping the C++ extension {PACKAGE}._C: {reason}")
            self.record = self._record(reason)
            path = os.path.join(self.build_lib, PACKAGE, BUILD_RECORD)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(self.record, f, indent=1)

        def _record(self, reason: str | None) -> dict:
            import torch

            cuda = any(src.endswith(".cu") for ext in self.extensions for src in ext.sources)
            return {
                "built": reason is None,
                "reason": reason,
                "torch": str(torch.__version__),
                "cuda": torch.version.cuda if cuda else None,
                "cuda_archs": _cuda_archs() if cuda else None,
            }

        def copy_extensions_to_source(self) -> None:
            """``--inplace`` and editable installs: the extension, if built, and the record."""
            if self.record["built"]:
                super().copy_extensions_to_source()
            package_dir = self.get_finalized_command("build_py").get_package_dir(PACKAGE)
            self.copy_file(
                os.path.join(self.build_lib, PACKAGE, BUILD_RECORD),
                os.path.join(package_dir, BUILD_RECORD),
            )

    return OptionalBuildExtension.with_options(use_ninja=True)


def _extensions() -> tuple[list, dict]:
    try:
        from torch.utils.cpp_extension import CppExtension, CUDAExtension
    except ImportError:
        _say(
            "torch is not importable here; building without the C++ extension. Install torch "
            "first and build with `pip install --no-build-isolation` to get it."
        )
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
            nvcc_flags += GENCODE
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags
        kwargs["define_macros"] = [("MDGD_WITH_CUDA", "1")]
        ext = CUDAExtension(f"{PACKAGE}._C", sources, **kwargs)
    else:
        ext = CppExtension(f"{PACKAGE}._C", sources, **kwargs)
    # Not ext.optional: OptionalBuildExtension catches every failure itself
    # (setuptools' optional flag lets ninja's RuntimeError abort the install).
    return [ext], {"build_ext": _build_ext_class()}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
