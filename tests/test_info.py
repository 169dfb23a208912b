"""``python -m mdgd_kernels.info`` and ``mdgd info``: every field a bug report needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import mdgd_kernels as mk
from mdgd.cli import main
from mdgd_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]
FIELDS = (
    "mdgd",
    "python",
    "torch",
    "CUDA",
    "Triton",
    "C++ extension",
    "CUDA kernels",
    "built against torch",
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
    if _ext.available:
        assert rows["C++ extension"] == f"loaded ({_ext._C.__file__})"
    else:
        assert (
            rows["C++ extension"].startswith("not loaded: ")
            and str(_ext.error) in rows["C++ extension"]
        )
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
