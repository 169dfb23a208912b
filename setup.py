"""Build mdgd's compiled kernels: two extensions, each optional on its own.

* ``mdgd_kernels._C``: the CPU kernels (csrc/ops.cpp, csrc/cpu/), always a
  ``CppExtension``.
* ``mdgd_kernels._C_cuda``: the CUDA kernels (csrc/ops_cuda.cpp, csrc/cuda/), a
  ``CUDAExtension`` built only when the installed torch is a CUDA build and a
  CUDA toolkit of the same major version is found (``find_cuda_toolkit``: CUDA_HOME,
  CUDA_PATH, an ``nvcc`` on PATH even when it is a wrapper script, /usr/local/cuda).
  ``MDGD_SKIP_CUDA_BUILD=1`` skips it anyway.

Each part is built on its own, so a CUDA toolkit that cannot compile or link costs
the CUDA kernels only, never the CPU ones. No failure fails the install: the
package still installs, says which part was not built and why (``pip install -v``
shows it), and ``import mdgd_kernels`` runs what is missing on the composed-torch
backend (one warning when the CPU kernels are missing). ``MDGD_SKIP_EXT=1`` skips
both parts on purpose. ``MAX_JOBS`` is honoured by ninja.

Either way the build writes ``mdgd_kernels/_C_build.json`` beside the extensions:
the torch it was built against and, per part, whether it was built, why not (the
compiler's last lines too) and, for the CUDA part, the toolkit and the nvcc command
line. ``mdgd_kernels._ext`` reads it before loading a part, so a part built against
another torch (an ABI mismatch) is never loaded; ``python -m mdgd_kernels.info``
prints it.

Install with ``pip install --no-build-isolation`` (``-e .`` in a checkout) so that
the build uses the torch you already have (torch is not a build requirement on
purpose: pip would fetch a CUDA build of it into the isolated build environment).
The sdist holds every file under csrc/ (MANIFEST.in), whatever machine made it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "mdgd_kernels"
BUILD_RECORD = "_C_build.json"  # read by mdgd_kernels/_ext.py: keep the two in sync
CPU_PART, CUDA_PART = "_C", "_C_cuda"  # module names, also the build record's keys
WITHOUT = {  # what runs instead of a part that is not built
    CPU_PART: "the ops on CPU tensors run on the slower composed-torch backend",
    CUDA_PART: "the ops on CUDA tensors run on the triton or the composed-torch backend",
}
# A100 and H100 SASS, plus sm_90 PTX so newer GPUs JIT instead of failing with
# "no kernel image". TORCH_CUDA_ARCH_LIST overrides.
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
DEFAULT_TOOLKITS = ("/usr/local/cuda",)
LOG_TAIL_LINES = 20  # of a failed part's build output, kept in the build record


def _switch(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def _say(*lines: str) -> None:
    print("\n".join(f"mdgd: {line}" for line in lines), file=sys.stderr, flush=True)


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# --------------------------------------------------------------------------- the toolkit


def _toolkit_problem(root: str) -> str | None:
    """What ``root`` lacks to be a CUDA toolkit cpp_extension can build and link with."""
    nvcc = os.path.join(root, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return f"no {nvcc}"
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return f"no {os.path.join(root, 'include', 'cuda_runtime.h')}"
    # the library directory cpp_extension links from: lib64, else lib
    libdir = os.path.join(root, "lib64")
    if not os.path.isdir(libdir) and os.path.isdir(os.path.join(root, "lib")):
        libdir = os.path.join(root, "lib")
    if not glob.glob(os.path.join(libdir, "libcudart.so*")):
        return f"no libcudart.so in {libdir}"
    return None


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit root that ``nvcc`` itself reports (its ``TOP``), whatever wraps it."""
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-E", "-x", "cu", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.normpath(found.group(1).strip()) if found else None


def find_cuda_toolkit(
    environ: dict | None = None, default_roots: tuple[str, ...] = DEFAULT_TOOLKITS
) -> tuple[str | None, str]:
    """The CUDA toolkit to build against: ``(root, how it was found)``, or
    ``(None, why there is none)``.

    In order: ``CUDA_HOME``, then ``CUDA_PATH`` (when set, the one answer: a broken
    one is reported, never silently replaced); an ``nvcc`` on ``PATH``, through its
    symlinks and, when that is a wrapper script (whose folder holds no toolkit),
    through the toolkit root nvcc reports itself (``nvcc --dryrun``); then
    ``default_roots``. A root counts when it holds ``bin/nvcc``,
    ``include/cuda_runtime.h`` and ``libcudart.so`` where cpp_extension links
    from (``lib64``, else ``lib``): torch's own guess takes a wrapper's folder and
    fails at link time with ``cannot find -lcudart``.
    """
    env = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = env.get(var)
        if root:
            problem = _toolkit_problem(root)
            if problem:
                return None, f"{var}={root} is not a usable CUDA toolkit ({problem})"
            return root, f"{var}={root}"
    nvcc = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if nvcc:
        tried = []
        for root in (os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), _nvcc_top(nvcc)):
            if root is None or root in (r for r, _ in tried):
                continue
            problem = _toolkit_problem(root)
            if problem is None:
                return root, f"the nvcc on PATH ({nvcc})"
            tried.append((root, problem))
        found = "; ".join(f"{root}: {problem}" for root, problem in tried)
        return None, (
            f"the nvcc on PATH ({nvcc}) belongs to no usable CUDA toolkit ({found}); set "
            "CUDA_HOME to the toolkit's root"
        )
    for root in default_roots:
        if os.path.isdir(root):
            problem = _toolkit_problem(root)
            if problem is None:
                return root, f"the default location {root}"
            return None, f"{root} is not a usable CUDA toolkit ({problem})"
    return None, "no CUDA toolkit found (no CUDA_HOME, CUDA_PATH or nvcc on PATH)"


def _cuda_plan() -> tuple[str | None, str]:
    """The toolkit for the CUDA part, or ``(None, why it is skipped)``."""
    if _switch("MDGD_SKIP_CUDA_BUILD"):
        return None, "MDGD_SKIP_CUDA_BUILD=1 was set"
    import torch

    if not torch.version.cuda:
        return None, f"torch {torch.__version__} is not a CUDA build"
    root, how = find_cuda_toolkit()
    if root is None:
        return None, how
    # BuildExtension refuses an nvcc whose CUDA major differs from torch's: check
    # first, to say so in the build record.
    nvcc = os.path.join(root, "bin", "nvcc")
    try:
        version = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{nvcc} --version does not run ({exc})"
    found = re.search(r"release (\d+)\.", version)
    if found and found.group(1) != torch.version.cuda.split(".")[0]:
        return None, (
            f"nvcc at {nvcc} is CUDA {found.group(1)}.x but torch was built with CUDA "
            f"{torch.version.cuda} (point CUDA_HOME at a toolkit with the same major version)"
        )
    return root, how


def _use_toolkit(root: str) -> str | None:
    """Point cpp_extension at ``root``; why it cannot be, if so."""
    # cpp_extension reads CUDA_HOME once, when it is first imported (below).
    os.environ["CUDA_HOME"] = root
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME != root:
        return (
            f"torch.utils.cpp_extension uses CUDA_HOME={CUDA_HOME}, not the toolkit found at "
            f"{root} (it was imported before setup.py chose); set CUDA_HOME={root}"
        )
    return None


# --------------------------------------------------------------------------- the two parts


@dataclass
class Part:
    """One extension module of mdgd_kernels: what it holds and what became of it."""

    name: str  # CPU_PART or CUDA_PART
    ext: object | None  # the setuptools Extension; None when skipped before the build
    reason: str | None = None  # why it is not built, None while it may be
    facts: dict = field(default_factory=dict)  # more for the build record

    def record(self) -> dict:
        return {"built": self.reason is None, "reason": self.reason, **self.facts}


def _cxx_flags() -> list[str]:
    # No -std: cpp_extension adds the one the installed torch needs (C++20 for
    # torch 2.13), the same for the .cpp and .cu files.
    flags = ["-O3", "-fopenmp"]
    if os.uname().machine in ("x86_64", "AMD64"):
        # Dispatch to AVX2/AVX-512 happens inside ATen's vectorised types at run
        # time only for ATen itself; our kernels are compiled for AVX2+FMA, which
        # every A100/H100 host CPU has. MDGD_NATIVE=0 disables it for old CPUs.
        if os.environ.get("MDGD_NATIVE", "1") != "0":
            flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _cpu_part(cpp_extension) -> Part:
    sources = ["csrc/ops.cpp", *_sources("csrc/cpu/*.cpp")]
    ext = cpp_extension.CppExtension(
        f"{PACKAGE}.{CPU_PART}",
        sources,
        extra_compile_args={"cxx": _cxx_flags()},
        extra_link_args=["-fopenmp"],
        include_dirs=[os.path.join(ROOT, "csrc")],
    )
    return Part(CPU_PART, ext)


def _cuda_part() -> Part:
    root, how = _cuda_plan()
    if root is None:
        return Part(CUDA_PART, None, f"skipped: {how}")
    import torch

    facts = {"cuda": torch.version.cuda, "toolkit": root, "toolkit_found_by": how}
    problem = _use_toolkit(root)
    if problem:
        return Part(CUDA_PART, None, f"skipped: {problem}", facts)
    from torch.utils.cpp_extension import CUDAExtension

    # No fast-math: segment_combine_ reproduces the torch backend's float32 bits.
    nvcc_flags = ["-O3", "-Xptxas=-warn-spills"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += GENCODE
    ext = CUDAExtension(
        f"{PACKAGE}.{CUDA_PART}",
        ["csrc/ops_cuda.cpp", *_sources("csrc/cuda/*.cu")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
        include_dirs=[os.path.join(ROOT, "csrc")],
    )
    return Part(CUDA_PART, ext, facts=facts)


@contextlib.contextmanager
def _captured_output(log: list[str]):
    """Send this process's stdout and stderr (ninja's, the compilers' and the
    linker's output included) to a file, append its text to ``log``, then echo it."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile() as tmp:
        try:
            for fd in saved:
                os.dup2(tmp.fileno(), fd)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            log.append(text)
            sys.stderr.write(text)
            sys.stderr.flush()


def _first_error(text: str) -> str | None:
    """The first line of a build log that says what went wrong."""
    for line in text.splitlines():
        if line.startswith(("[", "FAILED:")):  # ninja's echo of a command line
            continue
        if re.search(r"\b(error|fatal)\b|cannot find|undefined reference", line, re.IGNORECASE):
            return line.strip()
    return None


def _nvcc_command(text: str) -> str | None:
    """The first nvcc command line ninja ran (``ninja -v`` echoes each one)."""
    found = re.search(r"^\[\d+/\d+\] (\S*nvcc\S* .*)$", text, re.MULTILINE)
    return found.group(1) if found else None


def _tail(text: str) -> list[str]:
    """The last lines of a build log, without ninja's echo of each command line (the
    record keeps the nvcc one apart) and with long lines cut."""
    lines = [line for line in text.splitlines() if not re.match(r"\[\d+/\d+\] ", line)]
    return [line if len(line) <= 300 else line[:300] + " [...]" for line in lines][-LOG_TAIL_LINES:]


def _build_ext_class(parts: list[Part]):
    from torch.utils.cpp_extension import BuildExtension

    class PartwiseBuildExtension(BuildExtension):
        """``BuildExtension`` that builds each part on its own, never fails the
        install, and records what it built."""

        def build_extensions(self) -> None:
            for part in parts:
                if part.reason is None:
                    self._build_part(part)  # says why, if it fails
                else:
                    _say(f"{PACKAGE}.{part.name} is not built: {part.reason}")
                stale = self.get_ext_fullpath(f"{PACKAGE}.{part.name}")
                if part.reason is not None and os.path.exists(stale):
                    os.remove(stale)  # from an earlier build: it must not ship with this record
            # what the install, the wheel and --inplace copy: the parts that built
            self.extensions = [part.ext for part in parts if part.reason is None]
            self._write_record()

        def _build_part(self, part: Part) -> None:
            log: list[str] = []
            self.extensions = [part.ext]
            try:
                with _captured_output(log):
                    super().build_extensions()
            except Exception as exc:  # any compiler, linker or toolchain failure
                text = "".join(log)
                error = _first_error(text) or f"{type(exc).__name__}: {exc}".strip()
                part.reason = f"the build failed: {error}"
                part.facts["log_tail"] = _tail(text)
                _say(
                    f"{PACKAGE}.{part.name} was NOT built ({part.reason}); the build log "
                    "above says more.",
                    f"installing without it: {WITHOUT[part.name]}. Fix the toolchain and "
                    "reinstall to get these compiled kernels.",
                )
            if part.name == CUDA_PART:
                part.facts["nvcc_command"] = _nvcc_command("".join(log))

        def _write_record(self) -> None:
            import torch

            record = {
                "torch": str(torch.__version__),
                "parts": {part.name: part.record() for part in parts},
            }
            path = os.path.join(self.build_lib, PACKAGE, BUILD_RECORD)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(record, f, indent=1)

        def copy_extensions_to_source(self) -> None:
            """``--inplace`` and editable installs: the parts that built, the record,
            and no stale module of a part that did not."""
            super().copy_extensions_to_source()
            package_dir = self.get_finalized_command("build_py").get_package_dir(PACKAGE)
            for part in parts:
                if part.reason is not None:
                    fullname = f"{PACKAGE}.{part.name}"
                    stale = os.path.join(
                        package_dir, os.path.basename(self.get_ext_filename(fullname))
                    )
                    if os.path.exists(stale):
                        os.remove(stale)
            self.copy_file(
                os.path.join(self.build_lib, PACKAGE, BUILD_RECORD),
                os.path.join(package_dir, BUILD_RECORD),
            )

    return PartwiseBuildExtension.with_options(use_ninja=True)


def _parts() -> list[Part]:
    """The CPU part and the CUDA part, each with the reason it is skipped, if it is."""
    if _switch("MDGD_SKIP_EXT"):
        # the CPU Extension stays, unbuilt, so that build_ext runs and writes the record
        skip = "skipped: MDGD_SKIP_EXT=1 was set"
        cuda = Part(CUDA_PART, None, skip)
    else:
        skip = None
        cuda = _cuda_part()  # first: it may set CUDA_HOME before cpp_extension is imported
    import torch.utils.cpp_extension as cpp_extension

    cpu = _cpu_part(cpp_extension)
    cpu.reason = skip
    return [cpu, cuda]


def _extensions() -> tuple[list, dict]:
    try:
        import torch  # noqa: F401  (not torch.utils.cpp_extension: see _use_toolkit)
    except ImportError:
        _say(
            "torch is not importable here; building without the compiled kernels. Install "
            "torch first and build with `pip install --no-build-isolation` to get them."
        )
        return [], {}
    parts = _parts()
    return [p.ext for p in parts if p.ext is not None], {"build_ext": _build_ext_class(parts)}


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
