"""The public ops against the float64 oracle, on every backend present on CPU.

The Triton kernels have their own files (test_triton_interp.py, test_triton_aot.py,
test_triton_gpu.py) and the CUDA sources theirs (test_cuda_build.py); here run the
compiled CPU kernels and the composed-torch backend, through the public API.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import (
    CASES,
    DTYPE_IDS,
    DTYPES,
    MODES,
    assert_cos_close,
    assert_direction_close,
    assert_mask_matches,
    assert_stats_close,
    check_mask_all_tied,
    check_mask_threshold_ties,
    make_buffers,
    oracle,
)

import mdgd_kernels as mk
from mdgd_kernels.layout import CHUNK
from mdgd_kernels.reference import reference_top_alpha

BACKENDS = [b for b in mk.available_backends("cpu") if b != "triton"]


def _random_sizes(n: int, seed: int = 1234) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 300, (n,), generator=gen).tolist()


LAYOUTS = {
    "1-7-4097": [1, 7, 4097],
    "65537": [65537],
    "chunk+-1": [CHUNK - 1, CHUNK, CHUNK + 1, 3],
    "500segs": _random_sizes(500),
}


def _run(bufs, sizes, backend, **kw):
    out = [b.clone() for b in bufs]
    res = mk.mdgd_direction_(*out, sizes, backend=backend, **kw)
    for before, after in zip(bufs[1:], out[1:]):
        assert torch.equal(before, after), "only g_theta may be written"
    return out[0], res


def _check_result(d, res, ref, bufs, sizes, kw):
    assert_direction_close(d, ref, bufs, sizes)
    assert_cos_close(res.cos, ref, sizes)
    if kw.get("mode") == "gm":
        assert_mask_matches(res, ref, sizes, kw["alpha"], kw.get("alpha_by", "elements"))
    assert bool(res.skipped) == ref.skipped


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_direction_matches_oracle(backend, dtype, layout, mode, seed):
    sizes, kw = LAYOUTS[layout], MODES[mode]
    bufs = make_buffers(sizes, dtype, seed=seed)
    d, res = _run(bufs, sizes, backend, **kw)
    ref = oracle(bufs, sizes, **kw)
    _check_result(d, res, ref, bufs, sizes, kw)
    assert_stats_close(res.stats, bufs, sizes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", [c for c in CASES if c not in ("nan", "inf")])
@pytest.mark.parametrize("mode", ["mdgd", "gm-a0.5-segments"], ids=str)
def test_edge_cases_match_oracle(backend, dtype, case, mode, seed):
    sizes, kw = [1, 7, 129, 4097], MODES[mode]
    bufs = make_buffers(sizes, dtype, case=case, seed=seed)
    d, res = _run(bufs, sizes, backend, **kw)
    ref = oracle(bufs, sizes, **kw)
    _check_result(d, res, ref, bufs, sizes, kw)
    if case == "zero_h":
        assert torch.equal(res.s_theta, torch.zeros_like(res.s_theta))
    if case in ("zero_g_phi", "parallel"):
        assert torch.equal(res.k, torch.zeros_like(res.k)), "degenerate projections give k = 0"


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_int = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return torch.equal(a.view(as_int[a.dtype]), b.view(as_int[b.dtype]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("case", ["nan", "inf"])
def test_nonfinite_policies(backend, dtype, case, seed):
    sizes = [5, 1, 300, 77]
    bufs = make_buffers(sizes, dtype, case=case, seed=seed)
    out = [b.clone() for b in bufs]
    with pytest.raises(FloatingPointError, match=r"segment \d+ \(p\d\)"):
        mk.mdgd_direction_(*out, sizes, backend=backend, names=["p0", "p1", "p2", "p3"])
    assert all(_same_bits(a, b) for a, b in zip(bufs, out)), "raise must write nothing"
    res = mk.mdgd_direction_(*out, sizes, backend=backend, nonfinite="skip", mode="mdgd")
    assert bool(res.skipped)
    assert all(_same_bits(a, b) for a, b in zip(bufs, out)), "skip must leave every bit"
    bad = res.stats.isfinite().all(1).logical_not()
    assert bad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_statistics_are_bit_identical_across_calls(backend, dtype, seed):
    sizes = [CHUNK * 3 + 5, 1, 999, CHUNK]
    bufs = make_buffers(sizes, dtype, seed=seed)
    first = mk.segment_gram(*bufs, sizes, backend=backend)
    for _ in range(3):
        assert torch.equal(mk.segment_gram(*bufs, sizes, backend=backend), first)
    assert_stats_close(first, bufs, sizes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_segment(backend):
    sizes = [3, 0, 5]
    bufs = make_buffers(sizes, torch.float32, seed=3)
    stats = mk.segment_gram(*bufs, sizes, backend=backend)
    assert torch.equal(stats[1], torch.zeros(10))


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_bitwise_on_ft_and_identity(backend):
    """ft never writes; a masked-in gm segment is gt + ht rounded once."""
    sizes = [10, 20]
    bufs = make_buffers(sizes, torch.bfloat16, seed=5)
    d, _ = _run(bufs, sizes, backend, mode="ft")
    assert torch.equal(d, bufs[0])


def _op_args(dtype=torch.float32):
    sizes = [5, 1, 70]
    bufs = make_buffers(sizes, dtype, seed=11)
    layout = mk.get_layout(sizes, "cpu")
    return bufs, layout


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_opcheck(dtype):
    bufs, layout = _op_args(dtype)
    torch.library.opcheck(
        torch.ops.mdgd.segment_gram.default, (*bufs, layout.chunks, layout.chunk_ptr)
    )
    coeffs = torch.randn(layout.num_segments, 4)
    torch.library.opcheck(
        torch.ops.mdgd.segment_combine_.default, (*[b.clone() for b in bufs], layout.chunks, coeffs)
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


def test_missing_extension_falls_back_once_with_a_warning():
    """Without mdgd_kernels._C the package imports, runs on the torch backend and
    says so once; asking for backend='cpu' explicitly raises the original error."""
    code = """
import importlib.abc, sys, warnings
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "mdgd_kernels._C":
            raise ImportError("simulated: extension not built")
sys.meta_path.insert(0, Block())
import torch, mdgd_kernels as mk
assert not mk._ext.available and mk.available_backends("cpu") == ["torch"]
bufs = [torch.randn(10) for _ in range(4)]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        mk.mdgd_direction_(*[b.clone() for b in bufs], [3, 7])
msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
assert len(msgs) == 1 and "simulated" in msgs[0] and "falling back" in msgs[0], msgs
try:
    mk.mdgd_direction_(*bufs, [3, 7], backend="cpu")
except RuntimeError as exc:
    assert "simulated" in str(exc) and "pip install" in str(exc), exc
else:
    raise AssertionError("backend='cpu' without the extension must raise")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("align", [True, False], ids=["align", "noalign"])
def test_gm_masked_keep_touches_only_selected_segments(backend, dtype, align, seed):
    sizes = LAYOUTS["500segs"]
    kw = dict(mode="gm", alpha=0.3, align=align)
    bufs = make_buffers(sizes, dtype, seed=seed)
    d, res = _run(bufs, sizes, backend, masked="keep", **kw)
    ref = oracle(bufs, sizes, **kw)
    assert_mask_matches(res, ref, sizes, 0.3, "elements")
    keep = torch.repeat_interleave(res.mask.cpu(), torch.tensor(sizes))
    assert torch.equal(d[~keep], bufs[0][~keep]), "a dropped segment was written"
    # the selected segments get the bits of the default (Eq. 12, oracle-tested above)
    zero, _ = _run(bufs, sizes, backend, **kw)
    assert torch.equal(zero[keep], d[keep]) and not zero[~keep].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", ["mdgd", "mdgd-noalign", "gm-a0.1", "gm-a0.3-noalign", "ft"])
def test_scale_multiplies_the_direction(backend, dtype, mode, seed):
    """A power-of-two scale commutes with every rounding: the bits of scale * d, except
    where scale * d falls below the dtype's normal range (fp16 subnormals round). The
    bound is strict: a scaled value equal to the smallest normal can come from a
    float32 ``scale * d`` just below it, which rounds on the subnormal grid."""
    sizes, kw = LAYOUTS["1-7-4097"] + [300, 2], MODES[mode]
    bufs = make_buffers(sizes, dtype, seed=seed)
    plain, res = _run(bufs, sizes, backend, **kw)
    scaled, res_s = _run(bufs, sizes, backend, scale=0.25, **kw)
    want = plain * 0.25
    normal = want.abs() > torch.finfo(dtype).tiny
    assert torch.equal(scaled[normal], want[normal])
    assert ((scaled - want)[~normal].abs() <= torch.finfo(dtype).tiny).all()
    assert torch.equal(res_s.cos, res.cos) and torch.equal(res_s.mask, res.mask)
    if kw["mode"] == "gm":  # dropped segments keep g_theta's bits, selected ones are scaled
        kept, _ = _run(bufs, sizes, backend, scale=0.25, masked="keep", **kw)
        keep = torch.repeat_interleave(res.mask, torch.tensor(sizes))
        assert torch.equal(kept[keep], scaled[keep]) and torch.equal(kept[~keep], bufs[0][~keep])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("alpha_by", ["elements", "segments"])
@pytest.mark.parametrize("check", [check_mask_all_tied, check_mask_threshold_ties], ids=str)
def test_gm_mask_is_the_shortest_prefix_on_ties(backend, dtype, alpha_by, check, seed):
    check(lambda bufs, sizes, **kw: _run(bufs, sizes, backend, **kw), alpha_by, dtype, seed)


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
