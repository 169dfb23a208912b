"""Installing mdgd the way users do: the sdist, an optional extension, the build record.

* The sdist, built from a copy of the source tree, lists every file under csrc/
  (CUDA sources included, on a machine without CUDA) and no build output.
* The wheel built from that sdist holds the packages ``mdgd``, ``mdgd_kernels`` and
  ``mdgd_bench`` (the benchmarks' code, from benchmarks/mdgd_bench/) and nothing else.
* A CPU extension whose build record says it was built against another torch, or
  not built at all, is never loaded: import warns once, says why (and to
  rebuild), and the ops fall back to the torch backend; a record of this torch
  loads it.
* Slow (about 2 minutes on 2 cores, half of it installing torch 2.13.0 into a
  fresh venv): ``pip install --no-build-isolation`` of the sdist with a broken
  compiler (``CXX=false``, or one that fails every compile) succeeds, and the
  installed package warns once and gives the oracle's direction on the torch
  backend (tests/helpers/install_smoke.py).
  CI's sdist step (.ci/run) installs the same sdist with a working compiler.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch

from mdgd_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]
BUILD_OUTPUTS = ("*.so", "*.o", "_C_build.json")
# a copy of the tree keeps the checkout clean; build outputs stay in it on purpose
NOT_SOURCE = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "mdgd_demo_out"
)
PIP_TIMEOUT_S = 900


def _run(cmd: list, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw
    )
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist, as setuptools' sdist command (what ``python -m build --sdist`` runs) makes it."""
    tmp = tmp_path_factory.mktemp("sdist")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    _run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", tmp / "dist"], cwd=src)
    (found,) = (tmp / "dist").glob("mdgd-*.tar.gz")
    return found


def test_sdist_lists_every_csrc_file(sdist):
    listing = _run(["tar", "tzf", sdist]).stdout.split()
    top = listing[0].split("/")[0]
    names = {name.removeprefix(top + "/") for name in listing}
    csrc = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert {"csrc/cuda/segment_gram.cu", "csrc/cuda/chunk_io.cuh", "csrc/mdgd_common.h"} <= csrc
    assert csrc - names == set(), f"missing from the sdist: {sorted(csrc - names)}"
    needed_files = ("setup.py", "pyproject.toml", "MANIFEST.in", "tests/conftest.py")
    for needed in (*needed_files, "benchmarks/bench_step.py", "benchmarks/mdgd_bench/ops.py"):
        assert needed in names, f"{needed} missing from the sdist"
    outputs = [n for n in names if n.endswith((".so", ".o")) or n.endswith("_C_build.json")]
    assert not outputs, f"build outputs in the sdist: {outputs}"


def test_wheel_holds_the_three_packages_and_nothing_else(sdist, tmp_path):
    env = {**os.environ, "MDGD_SKIP_EXT": "1"}  # the packaging, not the compiler, is tested
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps"]
    _run([*cmd, "-w", tmp_path, sdist], env=env, timeout=PIP_TIMEOUT_S)
    (wheel,) = tmp_path.glob("mdgd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert tops == {"mdgd", "mdgd_kernels", "mdgd_bench"}, sorted(tops)
    bench = ROOT / "benchmarks"
    code = {p.relative_to(bench).as_posix() for p in (bench / "mdgd_bench").glob("*.py")}
    assert code - names == set(), f"benchmark code missing from the wheel: {code - names}"


# --------------------------------------------------------------------------- build record

FALLBACK_CHECK = """
import sys, warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mdgd_kernels as mk
    from mdgd_kernels.reference import reference_direction
    assert mk.__file__.startswith(sys.argv[1]), mk.__file__
    for _ in range(2):
        bufs = [torch.randn(10) for _ in range(4)]
        out = [b.clone() for b in bufs]
        mk.mdgd_direction_(*out, [3, 7])
        want = reference_direction(*bufs, [3, 7]).direction
        torch.testing.assert_close(out[0].double(), want, rtol=1e-4, atol=1e-5)
print("LOADED", "mdgd_kernels._C" in sys.modules)
print("WARNINGS", [str(w.message) for w in caught if "falling back" in str(w.message)])
from mdgd_kernels.info import report
print(report())
"""


def _package_with_record(tmp: Path, record: dict, real_so: bool) -> Path:
    """A copy of mdgd_kernels with ``record`` as its build record, beside a real
    extension or a file that is no shared library (loading it would fail)."""
    pkg = tmp / "pkg"
    shutil.copytree(ROOT / "mdgd_kernels", pkg / "mdgd_kernels", ignore=NOT_SOURCE)
    for pattern in BUILD_OUTPUTS:
        for stale in (pkg / "mdgd_kernels").glob(pattern):
            stale.unlink()
    so_name = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]
    if real_so:
        shutil.copy(_ext._C.__file__, pkg / "mdgd_kernels" / so_name)
    else:
        (pkg / "mdgd_kernels" / so_name).write_bytes(b"not a shared library")
    (pkg / "mdgd_kernels" / "_C_build.json").write_text(json.dumps(record))
    return pkg


def _record(torch_version: str = str(torch.__version__), **cpu_part) -> dict:
    """A build record as setup.py writes it on a CPU torch; ``cpu_part`` changes the CPU part."""
    cuda = {"built": False, "reason": "skipped: torch 2.13.0+cpu is not a CUDA build"}
    parts = {"_C": {"built": True, "reason": None, **cpu_part}, "_C_cuda": cuda}
    return {"torch": torch_version, "parts": parts}


def _import_with_record(tmp: Path, record: dict, real_so: bool = False) -> str:
    pkg = _package_with_record(tmp, record, real_so)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pkg), str(ROOT)])}
    env.pop("MDGD_BACKEND", None)
    cmd = [sys.executable, "-c", FALLBACK_CHECK, str(pkg)]
    return _run(cmd, env=env, cwd=tmp).stdout


def test_extension_built_against_another_torch_is_not_loaded(tmp_path):
    out = _import_with_record(tmp_path, _record("2.12.0"))
    assert "LOADED False" in out
    assert f"built against torch 2.12.0 but torch {torch.__version__} is installed" in out
    assert "needs a rebuild" in out and "rebuild it against the installed torch" in out
    (warnings_line,) = [line for line in out.splitlines() if line.startswith("WARNINGS")]
    assert warnings_line.count("falling back") == 1, warnings_line
    assert "built against torch: 2.12.0" in " ".join(out.split())


def test_extension_not_built_at_install_falls_back_with_the_reason(tmp_path):
    reason = "the build failed: RuntimeError: simulated compiler failure"
    out = _import_with_record(tmp_path, _record(built=False, reason=reason))
    assert "LOADED False" in out
    assert f"was not built when mdgd was installed: {reason}" in out
    assert out.count("falling back") == 1


@pytest.mark.skipif(not _ext.available, reason=f"mdgd_kernels._C did not load: {_ext.error}")
def test_extension_built_against_this_torch_loads(tmp_path):
    out = _import_with_record(tmp_path, _record(), real_so=True)
    assert "LOADED True" in out and "WARNINGS []" in out
    assert f"built against torch: {torch.__version__}" in " ".join(out.split())


# --------------------------------------------------------------------------- fresh venv


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A venv with nothing but torch 2.13.0 (the CPU wheel) and the build tools."""
    home = tmp_path_factory.mktemp("venv") / "env"
    venv.create(home, with_pip=True)
    python = home / "bin" / "python"
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, "torch==2.13.0", "setuptools", "wheel", "ninja"], timeout=PIP_TIMEOUT_S)
    return python


# passes the compiler checks of torch.utils.cpp_extension, then fails every compile
FAILING_CXX = """#!/bin/sh
case "$1" in -v|--version|-dumpversion|-dumpfullversion) exec c++ "$@";; esac
echo "simulated compile failure" >&2
exit 1
"""


def _broken_compiler(kind: str, tmp: Path) -> str:
    if kind == "false":  # no working compiler at all: cpp_extension's version probe fails
        return "false"
    script = tmp / "failing-c++"
    script.write_text(FAILING_CXX)
    script.chmod(0o755)
    return str(script)


@pytest.mark.slow
@pytest.mark.parametrize("compiler", ["false", "failing-compile"])
def test_install_with_a_broken_compiler_succeeds_and_falls_back(
    fresh_venv, sdist, tmp_path, compiler
):
    cxx = _broken_compiler(compiler, tmp_path)
    env = {**os.environ, "CXX": cxx, "CC": cxx}
    env.pop("PYTHONPATH", None)
    env.pop("MDGD_BACKEND", None)
    _run([fresh_venv, "-m", "pip", "uninstall", "-y", "-q", "mdgd"], env=env)
    cmd = [fresh_venv, "-m", "pip", "install", "-v", "--no-build-isolation", sdist]
    log = _run(cmd, env=env, timeout=PIP_TIMEOUT_S)
    assert "mdgd_kernels._C was NOT built" in log.stdout + log.stderr
    smoke = [fresh_venv, ROOT / "tests" / "helpers" / "install_smoke.py", "--backend", "torch"]
    out = _run(smoke, env=env, cwd=tmp_path).stdout
    assert "was not built when mdgd was installed" in out, out
    assert "smoke test passed on backend 'torch'" in out
