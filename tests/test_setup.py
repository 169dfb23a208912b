"""setup.py: the CUDA toolkit it finds, and a build that degrades part by part.

* ``find_cuda_toolkit`` on fake toolkit trees: an ``nvcc`` on PATH that is a wrapper
  script (torch's own guess takes the wrapper's folder and fails to link with
  ``cannot find -lcudart``), a symlinked one, a toolkit without libcudart, a
  ``CUDA_HOME`` that is no toolkit, none at all; and the local nvcc, if any.
* A CUDA torch, simulated (tests/helpers/cuda_torch_build.py), whose toolkit's nvcc
  fails every compile: ``setup.py build_ext --inplace`` finishes, the CPU kernels
  build and load (the ``cpu`` backend runs), the build record says the CUDA part
  failed and why, and ``mdgd_kernels.info`` reports both parts. This compiles the CPU
  kernels once (about a minute, up to 2 on 2 busy cores).
* The same with the local nvcc, reached through PATH (a wrapper script on some
  machines), when there is one: nvcc really runs the command line cpp_extension
  generates, and ``mdgd_kernels.info`` reads its architectures as nvcc's own dry run
  does. Against a CPU torch that build cannot succeed (no CUDA headers or libraries of
  torch's): the CUDA part fails, the CPU part stands. Reuses the tree built above.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nvcc_targets import nvcc_dryrun_targets
from setup_py import setup_py

from mdgd_kernels.info import cuda_archs

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "cuda_torch_build.py"
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    "mdgd_demo_out",
    "*.so",
    "*.o",
    "_C_build.json",
)
BUILD_TIMEOUT_S = 900
OPS = ("mdgd::segment_gram", "mdgd::segment_combine_")


# --------------------------------------------------------------------------- fake toolkits

FAKE_NVCC = """#!/bin/sh
# nvcc of a fake CUDA {version} toolkit: answers the probes, fails every compile
case "$*" in
  *--version*) echo "Cuda compilation tools, release {version}, V{version}.0"; exit 0;;
  *--dryrun*) echo "#\\$ TOP={root}/bin/.." >&2; exit 0;;
esac
echo "nvcc fatal   : simulated: the toolkit at {root} cannot compile" >&2
exit 1
"""


def _toolkit(root: Path, libcudart: bool = True, version: str = "13.0") -> Path:
    """A fake toolkit tree: bin/nvcc, include/cuda_runtime.h, lib64/libcudart.so."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "lib64").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(FAKE_NVCC.format(version=version, root=root))
    nvcc.chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    if libcudart:
        (root / "lib64" / "libcudart.so").write_text("")
    return root


def _wrapper(bindir: Path, target: Path) -> Path:
    """A wrapper script named nvcc in ``bindir``, as some machines put on PATH."""
    bindir.mkdir(parents=True, exist_ok=True)
    wrapper = bindir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_wrapper_nvcc_on_path_finds_its_toolkit(tmp_path):
    root = _toolkit(tmp_path / "cuda-13.0")
    wrapper = _wrapper(tmp_path / "usr" / "bin", root / "bin" / "nvcc")
    # torch's guess, the wrapper's grandparent, holds no toolkit
    assert setup_py._toolkit_problem(str(tmp_path / "usr")) is not None
    found, how = setup_py.find_cuda_toolkit({"PATH": str(wrapper.parent)}, default_roots=())
    assert found == str(root), how
    assert str(wrapper) in how


def test_symlinked_nvcc_resolves_to_its_toolkit(tmp_path):
    root = _toolkit(tmp_path / "cuda")
    # an nvcc that answers no probe: following the link is enough
    (root / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(root / "bin" / "nvcc")
    found, how = setup_py.find_cuda_toolkit({"PATH": str(tmp_path / "bin")}, default_roots=())
    assert found == str(root), how


def test_toolkit_without_libcudart_is_skipped_with_the_reason(tmp_path):
    root = _toolkit(tmp_path / "cuda", libcudart=False)
    wrapper = _wrapper(tmp_path / "bin", root / "bin" / "nvcc")
    found, why = setup_py.find_cuda_toolkit({"PATH": str(wrapper.parent)}, default_roots=())
    assert found is None
    assert f"no libcudart.so in {root / 'lib64'}" in why and "set CUDA_HOME" in why, why


def test_cuda_home_wins_and_is_checked(tmp_path):
    good = _toolkit(tmp_path / "good")
    broken = _toolkit(tmp_path / "broken", libcudart=False)
    path = str(_wrapper(tmp_path / "bin", good / "bin" / "nvcc").parent)
    found, how = setup_py.find_cuda_toolkit({"CUDA_HOME": str(good), "PATH": path})
    assert (found, how) == (str(good), f"CUDA_HOME={good}")
    # a CUDA_PATH that is no toolkit is reported, not replaced by the nvcc on PATH
    found, why = setup_py.find_cuda_toolkit({"CUDA_PATH": str(broken), "PATH": path})
    assert found is None and why.startswith(f"CUDA_PATH={broken} is not a usable"), why


def test_no_toolkit_at_all(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    found, why = setup_py.find_cuda_toolkit({"PATH": str(empty)}, default_roots=())
    assert found is None and why.startswith("no CUDA toolkit found"), why
    missing = str(tmp_path / "no-such-cuda")
    assert setup_py.find_cuda_toolkit({"PATH": str(empty)}, (missing,))[0] is None
    root = _toolkit(tmp_path / "usr-local-cuda")
    assert setup_py.find_cuda_toolkit({"PATH": str(empty)}, (str(root),))[0] == str(root)


LOCAL_NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(LOCAL_NVCC is None, reason="no nvcc on PATH")


def _without_cuda_vars() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}


@needs_nvcc
def test_local_nvcc_finds_a_toolkit():
    found, how = setup_py.find_cuda_toolkit(_without_cuda_vars())
    assert found is not None, how
    assert setup_py._toolkit_problem(found) is None
    print(f"\nnvcc on PATH: {LOCAL_NVCC}; toolkit: {found} ({how})")


# --------------------------------------------------------------------------- builds

PROBE = """
import json, warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mdgd_kernels as mk
from mdgd_kernels import _ext
from mdgd_kernels.info import collect
from mdgd_kernels.reference import reference_direction
bufs = [torch.randn(1000) for _ in range(4)]
out = [b.clone() for b in bufs]
mk.mdgd_direction_(*out, [300, 700], backend="cpu")
want = reference_direction(*bufs, [300, 700]).direction
torch.testing.assert_close(out[0].double(), want, rtol=1e-4, atol=1e-5)
has = torch._C._dispatch_has_kernel_for_dispatch_key
ops = ("mdgd::segment_gram", "mdgd::segment_combine_")
print(json.dumps({
    "package": mk.__file__,
    "cpu_loaded_from": _ext._C.__file__ if _ext.available else None,
    "cuda_error": str(_ext.cuda_error),
    "backends": mk.available_backends("cpu"),
    "picked": mk.resolve_backend(None, torch.device("cpu")),
    "cpu_kernels": [has(op, "CPU") for op in ops],
    "cuda_kernels": [has(op, "CUDA") for op in ops],
    "warnings": [str(w.message) for w in caught],
    "info": collect(),
}))
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A copy of the source tree without build outputs, built in place by the tests."""
    src = tmp_path_factory.mktemp("setup") / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    return src


def _build(tree: Path, env: dict, cuda_version: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``setup.py build_ext --inplace`` under a CUDA torch, simulated; the build record."""
    env = {**env, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    for switch in ("MDGD_SKIP_EXT", "MDGD_SKIP_CUDA_BUILD", "TORCH_CUDA_ARCH_LIST"):
        env.pop(switch, None)
    cmd = [sys.executable, HELPER, cuda_version, "build_ext", "--inplace"]
    out = subprocess.run(
        [str(c) for c in cmd],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert out.returncode == 0, f"the build failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    record = json.loads((tree / "mdgd_kernels" / "_C_build.json").read_text())
    return out, record


def _probe(tree: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    env.pop("MDGD_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_cpu_part_stands(tree: Path, record: dict) -> dict:
    """The CPU part built, loads from ``tree`` and runs; the CUDA part is absent."""
    assert record["parts"]["_C"] == {"built": True, "reason": None}, record["parts"]["_C"]
    assert not list((tree / "mdgd_kernels").glob("_C_cuda*.so")), "a failed part left a module"
    probe = _probe(tree)
    assert probe["package"].startswith(str(tree)), probe["package"]
    assert probe["cpu_loaded_from"].startswith(str(tree / "mdgd_kernels" / "_C.")), probe
    assert probe["backends"] == ["cpu", "torch"] and probe["picked"] == "cpu", probe
    assert probe["cpu_kernels"] == [True, True] and probe["cuda_kernels"] == [False, False]
    assert probe["warnings"] == [], "no fallback warning while the CPU kernels load"
    info = probe["info"]
    assert info["CPU kernels"] == f"loaded ({probe['cpu_loaded_from']})"
    assert info["CUDA kernels"].startswith("not loaded: ImportError: mdgd_kernels._C_cuda was not")
    return probe


def test_broken_cuda_toolkit_costs_only_the_cuda_part(tree, tmp_path):
    """The acceptance test of issue 18: a CUDA torch (simulated) whose toolkit, found
    through a wrapper nvcc on PATH, fails to compile; the CPU kernels build and load."""
    root = _toolkit(tmp_path / "cuda-13.0")
    wrapper = _wrapper(tmp_path / "bin", root / "bin" / "nvcc")
    env = _without_cuda_vars()
    env["PATH"] = f"{wrapper.parent}{os.pathsep}{env['PATH']}"
    out, record = _build(tree, env, "13.0")

    assert "mdgd_kernels._C_cuda was NOT built" in out.stderr
    cuda = record["parts"]["_C_cuda"]
    reason = f"nvcc fatal   : simulated: the toolkit at {root} cannot compile"
    assert cuda["built"] is False and cuda["reason"] == f"the build failed: {reason}", cuda
    assert cuda["toolkit"] == str(root) and cuda["cuda"] == "13.0"
    assert str(wrapper) in cuda["toolkit_found_by"]
    assert reason in "\n".join(cuda["log_tail"])
    # the command line cpp_extension generated, which the fake nvcc refused
    assert cuda["nvcc_command"].startswith(f"{root}/bin/nvcc "), cuda["nvcc_command"]
    assert cuda_archs(cuda["nvcc_command"]) == ["sm_80", "sm_90", "compute_90"]

    probe = _assert_cpu_part_stands(tree, record)
    info = probe["info"]
    assert reason in probe["cuda_error"] and reason in info["CUDA kernels"]
    assert info["CUDA toolkit"].startswith(f"{root} (found by the nvcc on PATH ({wrapper}))")
    assert info["CUDA architectures"] == "none (the build for sm_80 sm_90 compute_90 failed)"
    print("\nbuild record:", json.dumps(record, indent=1), "\ninfo:", json.dumps(info, indent=1))


@needs_nvcc
def test_local_nvcc_runs_and_info_reads_its_architectures(tree):
    toolkit, _ = setup_py.find_cuda_toolkit(_without_cuda_vars())
    if toolkit is None:
        pytest.skip("the local nvcc belongs to no usable toolkit")
    version = subprocess.run([LOCAL_NVCC, "--version"], capture_output=True, text=True).stdout
    cuda_version = re.search(r"release (\d+\.\d+)", version).group(1)
    out, record = _build(tree, _without_cuda_vars(), cuda_version)

    cuda = record["parts"]["_C_cuda"]
    assert cuda["toolkit"] == toolkit, cuda
    command = cuda["nvcc_command"]
    assert command and command.startswith(f"{toolkit}/bin/nvcc "), cuda
    # what info reads from the real command line is what nvcc makes of it
    assert sorted(cuda_archs(command)) == sorted(nvcc_dryrun_targets(shlex.split(command)))
    assert cuda_archs(command) == ["sm_80", "sm_90", "compute_90"]
    if cuda["built"]:  # a CPU torch has no CUDA libraries to link with
        pytest.fail(f"the CUDA part built against a CPU torch: {cuda}")
    assert cuda["reason"].startswith("the build failed: "), cuda

    probe = _assert_cpu_part_stands(tree, record)
    assert probe["info"]["CUDA toolkit"].startswith(f"{toolkit} (found by the nvcc on PATH")
    assert probe["info"]["CUDA architectures"] == (
        "none (the build for sm_80 sm_90 compute_90 failed)"
    )
    print("\nCUDA part:", json.dumps(cuda, indent=1))
