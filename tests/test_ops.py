"""The public ops on every backend present on CPU: ``cpu`` (the compiled kernels) and
``torch`` (the composed-torch ops), through the public API.

Each runs every shared op case of ``op_cases.py`` (the Triton interpreter runs the
same list in test_triton_interp.py, a GPU the same list for ``triton`` and ``cuda`` in
test_ops_gpu.py); then what does not depend on the backend: the argument checks,
the registered ops, torch.compile, the import, the fallback and the top-alpha mask.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, make_buffers
from op_cases import CASE_IDS, CASES, LARGE_CASE_IDS, LARGE_CASES, opcheck_ops, run_case

import mdgd_kernels as mk
from mdgd_kernels.reference import reference_top_alpha

BACKENDS = [b for b in mk.available_backends("cpu") if b != "triton"]
ROOT = Path(__file__).resolve().parents[1]
NO_BUILD_OUTPUTS = shutil.ignore_patterns("*.so", "_C_build.json", "__pycache__")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_op_case(case, backend, seed):
    run_case(case, backend, "cpu", seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LARGE_CASES, ids=LARGE_CASE_IDS)
def test_op_case_large(case, backend, seed):
    run_case(case, backend, "cpu", seed)


def test_bad_input_errors():
    bufs = make_buffers([4, 4], torch.float32, seed=0)
    with pytest.raises(ValueError, match="g_phi has 8 elements but sizes sum to 7|sizes sum to 7"):
        mk.mdgd_direction_(*bufs, [3, 4])
    with pytest.raises(ValueError, match="h_phi has 7 elements but g_theta has 8"):
        mk.mdgd_direction_(*bufs[:3], bufs[3][:7].contiguous(), [4, 4])
    with pytest.raises(ValueError, match="h_theta has dtype torch.float16"):
        mk.mdgd_direction_(bufs[0], bufs[1].half(), *bufs[2:], [4, 4])
    with pytest.raises(ValueError, match="g_phi must be contiguous"):
        mk.mdgd_direction_(*bufs[:2], torch.zeros(16)[::2], bufs[3], [4, 4])
    with pytest.raises(ValueError, match="g_theta must be a flat 1-D"):
        mk.mdgd_direction_(bufs[0].view(2, 4), *bufs[1:], [4, 4])
    with pytest.raises(ValueError, match="dtype torch.float64"):
        mk.mdgd_direction_(*(b.double() for b in bufs), [4, 4])
    with pytest.raises(ValueError, match="mode must be one of"):
        mk.mdgd_direction_(*bufs, [4, 4], mode="pcgrad")
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\]"):
        mk.mdgd_direction_(*bufs, [4, 4], mode="gm", alpha=0.0)
    with pytest.raises(ValueError, match="sizes must be non-negative"):
        mk.mdgd_direction_(*bufs, [9, -1])
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.mdgd_direction_(*bufs, [4, 4], backend="tpu")


def test_layout_of_an_unindexed_device_matches_its_buffers(monkeypatch):
    """``get_layout(sizes, "cuda")`` is keyed by the current GPU's index, as the buffers'
    ``cuda:0``: before, every op call of the benchmarks on a GPU raised "sizes is a layout
    on cuda but the buffers are on cuda:0" (found by benchmarks/gpu_check.sh)."""
    from mdgd_kernels.layout import canonical_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert canonical_device("cuda") == torch.device("cuda", 3)
    assert canonical_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert canonical_device("cpu") == torch.device("cpu")
    assert canonical_device("meta") == torch.device("meta")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_opcheck(dtype):
    opcheck_ops(
        torch.ops.mdgd.segment_gram.default, torch.ops.mdgd.segment_combine_.default, "cpu", dtype
    )


def test_torch_compile_matches_eager():
    sizes = [33, 1, 200]
    bufs = make_buffers(sizes, torch.float32, seed=2)

    def step(gt, ht, gp, hp):
        res = mk.mdgd_direction_(gt, ht, gp, hp, sizes, nonfinite="skip")
        return res.cos

    eager = [b.clone() for b in bufs]
    cos_e = step(*eager)
    compiled = [b.clone() for b in bufs]
    cos_c = torch.compile(step, fullgraph=False)(*compiled)
    torch.testing.assert_close(cos_c, cos_e)
    torch.testing.assert_close(compiled[0], eager[0])


def test_import_is_lean():
    """Importing the ops neither imports triton nor initialises CUDA."""
    code = (
        "import sys, torch, mdgd_kernels, mdgd; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert not torch.cuda.is_initialized(); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_missing_extension_falls_back_once_with_a_warning(tmp_path):
    """Without mdgd_kernels._C, ``import mdgd_kernels`` warns once (the README's
    promise), the ops run on the torch backend without another warning, and asking
    for backend='cpu' explicitly raises the original error. Run on a copy of the
    package without build outputs, so it holds whether or not _C built here."""
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "mdgd_kernels", pkg / "mdgd_kernels", ignore=NO_BUILD_OUTPUTS)
    code = """
import importlib.abc, sys, warnings
import torch
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mdgd_kernels._C":
            raise ImportError("simulated: extension not built")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as at_import:
    warnings.simplefilter("always")
    import mdgd_kernels as mk
assert mk.__file__.startswith(sys.argv[1]), mk.__file__
msgs = [str(w.message) for w in at_import if issubclass(w.category, RuntimeWarning)]
assert len(msgs) == 1 and "simulated" in msgs[0] and "falling back" in msgs[0], msgs
assert not mk._ext.available and mk.available_backends("cpu") == ["torch"]
bufs = [torch.randn(10) for _ in range(4)]
with warnings.catch_warnings(record=True) as later:
    warnings.simplefilter("always")
    for _ in range(2):
        mk.mdgd_direction_(*[b.clone() for b in bufs], [3, 7])
assert not [w for w in later if issubclass(w.category, RuntimeWarning)], later
try:
    mk.mdgd_direction_(*bufs, [3, 7], backend="cpu")
except RuntimeError as exc:
    assert "simulated" in str(exc) and "pip install" in str(exc), exc
else:
    raise AssertionError("backend='cpu' without the extension must raise")
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": str(pkg)}
    env.pop("MDGD_BACKEND", None)
    cmd = [sys.executable, "-c", code, str(pkg)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_top_alpha_mask_matches_the_oracle_walk(seed):
    """The device mask (sort + cumsum) against the oracle's walk, on random cosines
    drawn from a few values (many ties), random weights and alphas, zero weights too."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(200):
        n = int(torch.randint(1, 30, (1,), generator=gen))
        cos = torch.randint(-2, 3, (n,), generator=gen).double() / 2
        weights = torch.randint(0, 5, (n,), generator=gen)
        if not weights.any():
            weights[0] = 1
        alpha = float(torch.rand((), generator=gen).clamp(min=1e-3))
        got = mk.top_alpha_mask(cos, weights, alpha)
        want = reference_top_alpha(cos, weights.tolist(), alpha)
        assert torch.equal(got, want), (cos.tolist(), weights.tolist(), alpha)
        # a prefix of the (cos desc, index asc) order, reaching alpha, shortest
        order = sorted(range(n), key=lambda i: (-float(cos[i]), i))
        ranks = [order.index(i) for i in range(n) if got[i]]
        assert sorted(ranks) == list(range(len(ranks))), "not a prefix of the order"
        kept, last = int(weights[got].sum()), int(weights[order[len(ranks) - 1]])
        assert kept >= alpha * int(weights.sum()) > kept - last
