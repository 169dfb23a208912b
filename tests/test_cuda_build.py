"""The CUDA sources in csrc/cuda/ compile for A100 (sm_80) and H100 (sm_90).

setup.py builds csrc/cuda/*.cu (into mdgd_kernels._C_cuda) only against a CUDA
torch, so on a CPU-only machine the extension never sees them; this test proves
they compile anyway, with ``nvcc`` directly, as cpp_extension compiles them for
this torch: C++20, torch's include paths, ``-I csrc``, setup.py's ``GENCODE`` and
the flags ``BuildExtension`` adds (``COMMON_NVCC_FLAGS``: no implicit half/bf16
conversions or operators).

csrc/cuda/ mirrors csrc/cpu/: ``chunk_io.cuh`` (pure device code: chunk loads
and stores, float32 conversion, reductions) and ``launch.h`` (the host helpers)
are shared, and each pass is one ``.cu`` file with its kernels, its launcher and
its ``TORCH_LIBRARY_IMPL`` registration. Each ``.cu`` file is compiled on its
own; its launcher instantiates every kernel of the pass for every dtype. A CPU
torch wheel lacks the generated ``c10/cuda/impl/cuda_cmake_macros.h``; its only
content (``C10_CUDA_BUILD_SHARED_LIBS``) matters for Windows DLL exports, so
the test then sets ``C10_CUDA_NO_CMAKE_CONFIGURE_FILE``, the switch
c10/cuda/CUDAMacros.h offers for builds without it.

``-Xptxas -v`` reports registers and spills per kernel and arch; a kernel
without exactly one report per arch, or any spill, fails the test (run
``pytest -s`` to see the table). The compiles run in parallel (1.5 to 2
minutes on 2 busy cores). Skipped without nvcc. Nothing here runs a kernel:
that needs a GPU (tests/test_ops.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension
from setup_py import setup_py

from mdgd_kernels.info import cuda_archs

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
DEVICE_HEADER = CUDA_DIR / "chunk_io.cuh"

# setup.py's: SASS for A100 and H100, plus sm_90 PTX for newer GPUs.
GENCODE = setup_py.GENCODE
ARCHS = tuple(arch for arch in cuda_archs(GENCODE) if arch.startswith("sm_"))
DTYPES = {"float": "f32", "__half": "f16", "__nv_bfloat16": "bf16"}
COMPILE_TIMEOUT_S = 420

# Per .cu file (one pass each): the op it registers for the CUDA key, and every
# kernel it launches as report label -> (kernel, element type or None).
PASSES = {
    "segment_gram.cu": (
        "segment_gram",
        {
            **{f"gram_chunks[{n}]": ("segment_gram_chunks_kernel", t) for t, n in DTYPES.items()},
            "gram_finalize": ("segment_gram_finalize_kernel", None),
        },
    ),
    "segment_combine.cu": (
        "segment_combine_",
        {f"combine_chunks[{n}]": ("segment_combine_chunks_kernel", t) for t, n in DTYPES.items()},
    ),
}


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME]
    for home in filter(None, homes):
        candidate = Path(home) / "bin" / "nvcc"
        if candidate.is_file():
            return str(candidate)
    return None


NVCC = _nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, CUDA_PATH): cannot compile csrc/cuda"
)


@dataclass
class KernelInfo:
    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int


@dataclass
class Build:
    name: str
    cmd: list[str]
    returncode: int
    log: str
    skip_reason: str | None = None

    def kernels(self) -> dict[tuple[str, str], KernelInfo]:
        """(mangled kernel name, arch) -> ptxas resources, from the -Xptxas -v log."""
        out: dict[tuple[str, str], KernelInfo] = {}
        current = None
        props = None
        for line in self.log.splitlines():
            m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
            if m:
                current, props = (m.group(1), m.group(2)), None
                continue
            m = re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
            )
            if m and current:
                props = tuple(int(x) for x in m.groups())
                continue
            m = re.search(r"Used (\d+) registers", line)
            if m and current and props:
                out[current] = KernelInfo(int(m.group(1)), *props)
                current = props = None
        return out


def _common_flags() -> list[str]:
    return [
        "-O3",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-Xptxas",
        "-v",
        *GENCODE,
        "--compiler-options",
        "-fPIC",
    ]


def _pass_cmd(source: Path, out: Path) -> tuple[list[str], str | None]:
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    defines = []
    torch_inc = Path(cpp_extension.include_paths()[0])
    for needed in ("torch/library.h", "c10/cuda/CUDAGuard.h", "c10/cuda/CUDAStream.h"):
        if not (torch_inc / needed).is_file():
            return [], f"the installed torch ({torch.__version__}) ships no {needed}"
    if not (torch_inc / "c10/cuda/impl/cuda_cmake_macros.h").is_file():
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    cmd = [
        NVCC,
        "-std=c++20",
        *_common_flags(),
        *defines,
        f"-I{ROOT / 'csrc'}",
        *includes,
        "-c",
        str(source),
        "-o",
        str(out),
    ]
    return cmd, None


_MISSING_HEADER = re.compile(r"fatal error: ([\w./+-]+): No such file or directory")


def _own_headers() -> set[str]:
    """The headers csrc/ includes with quotes: ours, so never missing for a good reason."""
    return {
        name
        for path in (ROOT / "csrc").rglob("*")
        if path.suffix in (".h", ".cuh", ".cpp", ".cu")
        for name in re.findall(r'#include\s*"([^"]+)"', path.read_text())
    }


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Build]:
    """One compile per .cu file, started together (each is mostly single-threaded)."""
    tmp = tmp_path_factory.mktemp("cuda_build")
    plans = {}
    for name in PASSES:
        cmd, skip = _pass_cmd(CUDA_DIR / name, tmp / f"{Path(name).stem}.o")
        if skip is not None:
            pytest.skip(f"csrc/cuda not compiled: {skip}")
        plans[name] = cmd
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in plans.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            log, _ = proc.communicate(timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
            log += f"\n[timed out after {COMPILE_TIMEOUT_S} s]"
        build = Build(name, plans[name], proc.returncode, log)
        missing = _MISSING_HEADER.search(log)
        # A header that neither the toolkit nor the torch wheel has is outside
        # this project; a missing header of our own is a real failure.
        if proc.returncode != 0 and missing and missing.group(1) not in _own_headers():
            build.skip_reason = (
                f"{missing.group(1)} is missing from the CUDA toolkit at {NVCC} or from the "
                f"installed torch {torch.__version__}'s headers"
            )
        results[name] = build
    return results


def _mangled(name: str, dtype: str | None) -> str:
    """The mangled-name fragment of a kernel: its name and its dtype, if any."""
    return f"{len(name)}{name}I{_itanium(dtype) if dtype else ''}"


def _itanium(t: str) -> str:
    return {"float": "f", "__half": "6__half", "__nv_bfloat16": "13__nv_bfloat16"}[t]


def _report(build: Build) -> tuple[str, list[str]]:
    """A register/spill table for every expected kernel and arch, and the problems."""
    found = build.kernels()
    rows, problems = [], []
    for label, (name, dtype) in PASSES[build.name][1].items():
        frag = _mangled(name, dtype)
        for arch in ARCHS:
            hits = [info for (mangled, a), info in found.items() if a == arch and frag in mangled]
            if len(hits) != 1:
                problems.append(f"{label} for {arch}: {len(hits)} ptxas reports, expected 1")
                continue
            info = hits[0]
            rows.append(
                f"  {label:<22} {arch}  {info.registers:3d} regs  stack {info.stack_bytes:3d} B  "
                f"spill stores {info.spill_stores} B  spill loads {info.spill_loads} B"
            )
            if info.spill_stores or info.spill_loads:
                problems.append(
                    f"{label} spills on {arch}: {info.spill_stores} B stored, "
                    f"{info.spill_loads} B loaded"
                )
    table = f"[{build.name}] {' '.join(build.cmd)}\n" + "\n".join(rows)
    return table, problems


def _check(build: Build) -> None:
    if build.skip_reason:
        pytest.skip(f"{build.name} not compiled: {build.skip_reason}")
    assert build.returncode == 0, (
        f"nvcc failed ({build.returncode}):\n{' '.join(build.cmd)}\n{build.log[-6000:]}"
    )
    table, problems = _report(build)
    # Warnings from torch's headers are not ours; warnings from csrc/cuda are.
    problems += [
        line for line in build.log.splitlines() if "warning" in line and str(CUDA_DIR) in line
    ]
    print("\n" + table)
    assert not problems, "\n".join(problems) + "\n" + table


def _defined_kernels(source: str) -> set[str]:
    """The names of the __global__ functions a source defines."""
    return {
        re.findall(r"(\w+)\(", line)[-1] for line in source.splitlines() if "__global__" in line
    }


def test_device_header_includes_only_cuda_headers() -> None:
    includes = re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", DEVICE_HEADER.read_text())
    assert sorted(includes) == ["cstdint", "cuda_bf16.h", "cuda_fp16.h"], includes
    assert not _defined_kernels(DEVICE_HEADER.read_text()), "kernels belong in their pass's .cu"


def test_every_cuda_source_and_kernel_is_checked() -> None:
    """setup.py compiles csrc/cuda/*.cu: each one, and each kernel in it, is compiled here."""
    assert sorted(p.name for p in CUDA_DIR.glob("*.cu")) == sorted(PASSES)
    for name, (_, kernels) in PASSES.items():
        defined = _defined_kernels((CUDA_DIR / name).read_text())
        assert defined == {kernel for kernel, _ in kernels.values()}, name


@pytest.mark.parametrize("name", sorted(PASSES))
def test_pass_compiles_for_sm80_sm90_without_spills(builds, name: str) -> None:
    _check(builds[name])
    # Each pass registers its own op for the CUDA key (TORCH_LIBRARY_IMPL), not a
    # bare pybind11 function, and never defines the schemas a second time.
    source = (CUDA_DIR / name).read_text()
    assert "TORCH_LIBRARY_IMPL(mdgd, CUDA, m)" in source
    assert f'm.impl("{PASSES[name][0]}",' in source
    assert "PYBIND11_MODULE" not in source and "TORCH_LIBRARY(" not in source
