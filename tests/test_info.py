"""``python -m mdgd_kernels.info`` and ``mdgd info``: every field a bug report needs,
and ``cuda_archs``, which reads the CUDA architectures off an nvcc command line: on
hand-written forms of nvcc's target options, each checked against nvcc's own dry
run where nvcc is present, and on a command line copied from a real build log.
tests/test_setup.py checks it on the command line cpp_extension generates for a real
compile of csrc/cuda with the local nvcc."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from nvcc_targets import nvcc_dryrun_targets

import mdgd_kernels as mk
from mdgd.cli import main
from mdgd_kernels import _ext
from mdgd_kernels.info import cuda_archs

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
    "mdgd",
    "python",
    "torch",
    "CUDA",
    "Triton",
    "transformers, accelerate, deepspeed",
    "CPU kernels",
    "CUDA kernels",
    "built against torch",
    "CUDA toolkit",
    "CUDA architectures",
    "backends on cpu",
    "backends on cuda",
    "MDGD_BACKEND",
    "threads",
)


def _parse(text: str) -> dict[str, str]:
    rows = {}
    for line in text.strip().splitlines():
        label, sep, value = line.partition(": ")
        assert sep, f"not a 'label: value' line: {line!r}"
        rows[label.strip()] = value.strip()
    return rows


def test_python_m_info_prints_every_field():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MDGD_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-m", "mdgd_kernels.info"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    )
    rows = _parse(out.stdout)
    assert tuple(rows) == FIELDS
    assert rows["torch"] == str(torch.__version__)
    assert re.match(r"\d+\.\d+\.\d+", rows["mdgd"]), rows["mdgd"]
    assert str(ROOT) in rows["mdgd"], "the report must say where mdgd was imported from"
    assert rows["python"].startswith(".".join(map(str, sys.version_info[:3])))
    expect_cuda = (
        "none (a CPU build of torch)" if torch.version.cuda is None else torch.version.cuda
    )
    assert rows["CUDA"].startswith(expect_cuda)
    for label, module, error in (
        ("CPU kernels", _ext._C, _ext.error),
        ("CUDA kernels", _ext._C_cuda, _ext.cuda_error),
    ):
        if module is not None:
            assert rows[label] == f"loaded ({module.__file__})"
        else:
            assert rows[label] == f"not loaded: {type(error).__name__}: {error}", rows[label]
    if _ext.build is not None:
        assert rows["built against torch"] == _ext.build["torch"]
    picked = "cpu" if _ext.available else "torch"
    backends = ", ".join(mk.available_backends("cpu"))
    assert rows["backends on cpu"] == f"{backends}; backend=None picks {picked!r}"
    assert rows["MDGD_BACKEND"] == "unset"
    assert re.fullmatch(r"1 intra-op, \d+ inter-op \(OMP_NUM_THREADS=1\)", rows["threads"])


def test_mdgd_info_is_the_same_report(capsys):
    assert main(["info"]) == 0
    assert tuple(_parse(capsys.readouterr().out)) == FIELDS


# (nvcc's target options, what they compile for), by test id; each is a form nvcc accepts
ARCH_FORMS = {
    "setup-gencode": (
        "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90 "
        "-gencode=arch=compute_90,code=compute_90",
        ["sm_80", "sm_90", "compute_90"],
    ),
    "gencode-space": (
        "-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=compute_90",
        ["sm_80", "compute_90"],
    ),
    "generate-code": (
        "--generate-code=arch=compute_90,code=sm_90 --generate-code arch=compute_80,code=sm_80",
        ["sm_90", "sm_80"],
    ),
    "code-list": ("-gencode=arch=compute_90,code=[sm_90,compute_90]", ["sm_90", "compute_90"]),
    "code-quoted": (
        "'-gencode=arch=compute_80,code=\"sm_80,compute_80\"'",
        ["sm_80", "compute_80"],
    ),
    "arch-real": ("-arch=sm_90", ["sm_90", "compute_90"]),
    "arch-space": ("-arch sm_80", ["sm_80", "compute_80"]),
    "arch-virtual": ("-arch=compute_80", ["compute_80"]),
    "arch-code": ("-arch=compute_90 -code=sm_90", ["sm_90"]),
    "gpu-architecture": (
        "--gpu-architecture=compute_80 --gpu-code=sm_80,compute_80",
        ["sm_80", "compute_80"],
    ),
}
# The nvcc command line of a real build of the CUDA kernels, as ninja echoed it
# (torch 2.13's cpp_extension, CUDA 13.0), with the folders before csrc/ and the
# include directories cut: the quoting is torch's.
REAL_LOG_COMMAND = (
    "nvcc -MD -MF build/temp.linux-x86_64-cpython-311/csrc/cuda/"
    "segment_gram.o.d -Icsrc -c -c csrc/cuda/segment_gram.cu -o build/temp.linux-x86_64-"
    "cpython-311/csrc/cuda/segment_gram.o -D__CUDA_NO_HALF_OPERATORS__ "
    "-D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ "
    "-D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr --compiler-options "
    "''\"'\"'-fPIC'\"'\"'' -O3 -Xptxas=-warn-spills -gencode=arch=compute_80,code=sm_80 "
    "-gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_90,code=compute_90 "
    "-DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C_cuda -std=c++20"
)
NVCC = shutil.which("nvcc")


@pytest.mark.parametrize("options,want", ARCH_FORMS.values(), ids=ARCH_FORMS)
def test_cuda_archs_reads_every_target_option(options, want):
    assert cuda_archs(f"nvcc {options} -c k.cu -o k.o") == want
    assert cuda_archs(["nvcc", *shlex.split(options)]) == want


def test_cuda_archs_on_a_real_build_log_line():
    # "-gencode=arch=..." once read as "code=arch": the report said "arch arch arch"
    assert cuda_archs(REAL_LOG_COMMAND) == ["sm_80", "sm_90", "compute_90"]
    assert cuda_archs("nvcc -arch=native -c k.cu") == ["native"]
    assert cuda_archs("nvcc -c k.cu") == []


@pytest.mark.skipif(NVCC is None, reason="no nvcc on PATH")
@pytest.mark.parametrize("options,want", ARCH_FORMS.values(), ids=ARCH_FORMS)
def test_cuda_archs_agrees_with_nvcc(options, want, tmp_path):
    source = tmp_path / "k.cu"
    source.write_text("__global__ void k(float* x) { x[threadIdx.x] = 1.f; }\n")
    command = [NVCC, *shlex.split(options), "-c", str(source), "-o", str(tmp_path / "k.o")]
    assert sorted(nvcc_dryrun_targets(command)) == sorted(want)
