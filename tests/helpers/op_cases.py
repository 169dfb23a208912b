"""Every op case, and the one table of them that every backend runs.

Not a test file. Each ``case_*`` function checks one backend (``"cpu"``, ``"torch"``,
``"triton"``, ``"cuda"``) on one device against the float64 oracle of conftest, on fresh
random inputs (``seed``) and the edge cases of docs/math.md. ``CASES`` parametrizes
them; ``run_case`` runs one. Arguments are plain values, so the Triton interpreter's
worker subprocess (``triton_worker.py``) can run a case it is sent by name:

* ``tests/test_ops.py``: backends ``cpu`` and ``torch``, in process;
* ``tests/test_triton_interp.py``: backend ``triton`` on CPU tensors, in the
  ``TRITON_INTERPRET=1`` worker;
* ``tests/test_ops_gpu.py``: backends ``triton`` and ``cuda`` on a CUDA GPU.

Sizes are chosen for the interpreter, which runs one Triton program instance at a
time: a chunk smaller than ``CHUNK`` gives multi-chunk segments and unaligned chunk
starts at little cost, and the layouts at the real ``CHUNK`` run the modes whose
passes take distinct paths.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from conftest import (
    DTYPE_IDS,
    MODES,
    assert_cos_close,
    assert_direction_close,
    assert_mask_matches,
    assert_stats_close,
    check_mask_all_tied,
    check_mask_threshold_ties,
    make_buffers,
    oracle,
    same_bits,
)
from tolerances import combine_bound

import mdgd_kernels as mk
from mdgd_kernels.layout import CHUNK

DTYPE_BY_ID = {v: k for k, v in DTYPE_IDS.items()}
DTYPE_NAMES = tuple(DTYPE_IDS.values())


def random_sizes(n: int, seed: int = 4321) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 300, (n,), generator=gen).tolist()


# name: (sizes, chunk, the modes it runs in)
LAYOUTS = {
    # size 1, a prime, each side of a vector step, just over a Triton block (1024)
    "1-7-129-1025": ([1, 7, 129, 1025], CHUNK, tuple(MODES)),
    # the real chunk (64 Triton blocks) and an element: two chunks, the second of one
    # element; 65K elements: the CPU kernels' parallel path
    "chunk+1": ([CHUNK + 1, 3], CHUNK, ("mdgd",)),
    # a chunk of 1000: 17 chunks, most starting unaligned; segments of a chunk, one short
    # and one over, each side of 512 and 2048; the passes' distinct paths: 4 buffers
    # read (mdgd), 2 read and zeros written (gm), untouched (no align)
    "blocks+-1-chunk1000": (
        [511, 513, 999, 1000, 1001, 2047, 2049, 4097],
        1000,
        ("mdgd", "gm-a0.1", "gm-a0.3-noalign"),
    ),
    # many segments: the chunk table and the top-alpha ranking by elements and by segments
    "40segs": (random_sizes(40), CHUNK, ("gm-a0.1", "gm-a0.5-segments")),
}
# Production-size layouts, every mode: run by the backends at native speed (cpu, torch,
# and triton/cuda on a GPU); the interpreter would take minutes, so it runs LAYOUTS only.
LARGE_LAYOUTS = {
    "65537": ([65537], CHUNK, tuple(MODES)),
    "chunk+-1": ([CHUNK - 1, CHUNK, CHUNK + 1, 3], CHUNK, tuple(MODES)),
    "500segs": (random_sizes(500), CHUNK, tuple(MODES)),
}
EDGE_SIZES = [1, 7, 129, 1025]
NONFINITE_SIZES = [5, 1, 300, 77]
SCALE_SIZES = [1, 7, 129, 300, 2]
MASKED_SIZES = random_sizes(8)
SCALE_MODES = ("mdgd", "mdgd-noalign", "gm-a0.1", "gm-a0.3-noalign", "ft")
EDGE_CASES = ("zero_h", "zero_g_phi", "parallel", "random")


class Case(NamedTuple):
    """One parametrization: the ``case_<func>`` to run and its arguments (plain values)."""

    func: str
    kwargs: dict

    @property
    def id(self) -> str:
        return "-".join([self.func, *map(str, self.kwargs.values())])


def _direction_cases(layouts: dict) -> list[Case]:
    return [
        Case("direction", dict(layout=layout, mode=m, dtype=d))
        for layout, (_, _, modes) in layouts.items()
        for m in modes
        for d in DTYPE_NAMES
    ]


def _case_table() -> list[Case]:
    cases = _direction_cases(LAYOUTS)
    for mode in ("mdgd", "gm-a0.5-segments"):
        cases += [
            Case("edge", dict(case=c, mode=mode, dtype=d)) for c in EDGE_CASES for d in DTYPE_NAMES
        ]
    cases += [Case("nonfinite", dict(case=c, dtype=d)) for c in ("nan", "inf") for d in DTYPE_NAMES]
    cases += [
        Case("mask_ties", dict(check=c, alpha_by=a, dtype=d))
        for c in ("all", "threshold")
        for a in ("elements", "segments")
        for d in ("fp32", "bf16")
    ]
    cases += [
        Case(f, dict(dtype=d)) for f in ("stats_bits", "empty", "coeff_rules") for d in DTYPE_NAMES
    ]
    cases += [
        Case("masked_keep", dict(align=a, dtype=d))
        for a in ("align", "noalign")
        for d in DTYPE_NAMES
    ]
    cases += [Case("scale", dict(mode=m, dtype=d)) for m in SCALE_MODES for d in DTYPE_NAMES]
    return cases


CASES = _case_table()
CASE_IDS = [c.id for c in CASES]
LARGE_CASES = _direction_cases(LARGE_LAYOUTS)
_ALL_LAYOUTS = {**LAYOUTS, **LARGE_LAYOUTS}
LARGE_CASE_IDS = [c.id for c in LARGE_CASES]


def run_case(case: Case, backend: str, device: str, seed: int) -> None:
    """Run one case of ``CASES`` on ``backend`` with tensors on ``device``."""
    globals()[f"case_{case.func}"](backend, device, seed=seed, **case.kwargs)


# ====================================================================== shared steps


def _on(device: str, bufs) -> list[torch.Tensor]:
    """Copies of the host ``bufs`` on ``device`` (copies on CPU too: the originals are
    what the results are compared with)."""
    return [b.to(device, copy=True) for b in bufs]


def _run(backend: str, bufs, sizes, **kw):
    """The op on copies of ``bufs``: ``(d, result)``; only ``g_theta`` may be written."""
    out = [b.clone() for b in bufs]
    res = mk.mdgd_direction_(*out, sizes, backend=backend, **kw)
    for name, before, after in zip(("h_theta", "g_phi", "h_phi"), bufs[1:], out[1:]):
        assert same_bits(before, after), f"{name} was written; only g_theta may be"
    return out[0], res


def _check_against_oracle(d, res, bufs, sizes, kw) -> None:
    """d, cos, the mask (gm), ft's untouched bits and the skip flag against the oracle."""
    ref = oracle(bufs, sizes, **kw)
    assert_direction_close(d, ref, bufs, sizes)
    assert_cos_close(res.cos, ref, sizes)
    if kw.get("mode") == "gm":
        assert_mask_matches(res, ref, sizes, kw["alpha"], kw.get("alpha_by", "elements"))
    if kw.get("mode") == "ft":
        assert same_bits(d.cpu(), bufs[0]), "ft must leave g_theta's bits"
    assert bool(res.skipped) == ref.skipped
    assert_stats_close(res.stats, bufs, sizes)


def expected_combine(bufs, sizes, coeffs) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``sum_j c_j x_j`` per element (zero coefficient: not read), and the sum of
    its terms' magnitudes ``sum_j |c_j x_j|`` (what float32 rounding is relative to)."""
    outs, terms = [], []
    for s, xs in enumerate(zip(*(torch.split(b.double().cpu(), sizes) for b in bufs))):
        d = torch.zeros(sizes[s], dtype=torch.float64)
        t = torch.zeros(sizes[s], dtype=torch.float64)
        for cj, x in zip(coeffs[s].double().tolist(), xs):
            if cj != 0:
                d += cj * x
                t += abs(cj) * x.abs()
        outs.append(d)
        terms.append(t)
    return torch.cat(outs), torch.cat(terms)


def interpreter_truncates(backend: str, device: str, dtype: torch.dtype) -> bool:
    """Triton's interpreter (Triton on CPU tensors) casts float32 to bf16 toward zero."""
    return backend == "triton" and device == "cpu" and dtype == torch.bfloat16


def assert_combine_close(d, bufs, sizes, coeffs, *, truncates: bool = False) -> None:
    """Pass 2 with given coefficients: float32 arithmetic rounded once to the dtype
    (``tolerances.combine_bound``; ``truncates``: :func:`interpreter_truncates`); beyond
    the dtype's range a result rounds to inf."""
    want, terms = expected_combine(bufs, sizes, coeffs)
    fi = torch.finfo(d.dtype)
    edge = fi.max * (1 + fi.eps / 2)  # the rounding threshold to inf
    got = d.double().cpu().clamp(-edge, edge)
    err = (got - want.clamp(-edge, edge)).abs()
    bound = combine_bound(want, terms, d.dtype, truncates=truncates)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"pass 2 differs at {torch.nonzero(bad)[:3].flatten().tolist()}: got "
        f"{got[bad][:3].tolist()} want {want[bad][:3].tolist()} |diff| {err[bad][:3].tolist()} "
        f"bound {bound[bad][:3].tolist()}"
    )


def _segment_finite(bufs, sizes) -> torch.Tensor:
    parts = [torch.split(b.double(), sizes) for b in bufs]
    return torch.tensor(
        [all(bool(p[s].isfinite().all()) for p in parts) for s in range(len(sizes))]
    )


# ====================================================================== the cases


def case_direction(backend: str, device: str, *, layout: str, mode: str, dtype: str, seed: int):
    """Every output against the oracle on one layout, chunk size and mode."""
    sizes, chunk, _ = _ALL_LAYOUTS[layout]
    kw = MODES[mode]
    bufs = make_buffers(sizes, DTYPE_BY_ID[dtype], seed=seed)
    d, res = _run(backend, _on(device, bufs), mk.get_layout(sizes, device, chunk), **kw)
    _check_against_oracle(d, res, bufs, sizes, kw)


def case_edge(backend: str, device: str, *, case: str, mode: str, dtype: str, seed: int):
    """Zero h, zero g_phi, exactly parallel g and h: degenerate projections (docs/math.md §4)."""
    kw = MODES[mode]
    bufs = make_buffers(EDGE_SIZES, DTYPE_BY_ID[dtype], case=case, seed=seed)
    d, res = _run(backend, _on(device, bufs), EDGE_SIZES, **kw)
    _check_against_oracle(d, res, bufs, EDGE_SIZES, kw)
    if case == "zero_h":
        assert torch.equal(res.s_theta.cpu(), torch.zeros(len(EDGE_SIZES))), "h = 0 gives s = 0"
    if case in ("zero_g_phi", "parallel"):
        assert torch.equal(res.k.cpu(), torch.zeros(len(EDGE_SIZES))), (
            "degenerate projections give k = 0"
        )


def case_nonfinite(backend: str, device: str, *, case: str, dtype: str, seed: int):
    """A NaN or -Inf: 'raise' names the segment and writes nothing, 'skip' leaves every
    bit, in every mode, and flags exactly the segments that hold it."""
    sizes = NONFINITE_SIZES
    bufs = make_buffers(sizes, DTYPE_BY_ID[dtype], case=case, seed=seed)
    out = _on(device, bufs)
    with pytest.raises(FloatingPointError, match=r"segment \d+ \(p\d\)"):
        mk.mdgd_direction_(*out, sizes, backend=backend, names=["p0", "p1", "p2", "p3"])
    assert all(same_bits(a, b.cpu()) for a, b in zip(bufs, out)), "raise must write nothing"
    for mode in ("mdgd", "gm", "ft"):
        res = mk.mdgd_direction_(*out, sizes, backend=backend, nonfinite="skip", mode=mode)
        assert bool(res.skipped)
        assert all(same_bits(a, b.cpu()) for a, b in zip(bufs, out)), "skip must leave every bit"
        flagged = ~res.stats.isfinite().all(1).cpu()
        assert torch.equal(flagged, ~_segment_finite(bufs, sizes)), "wrong segment flagged"


def case_mask_ties(backend: str, device: str, *, check: str, alpha_by: str, dtype: str, seed: int):
    """Exactly tied cos: MDGD-GM keeps the shortest prefix, lower index first (§6)."""
    checks = {"all": check_mask_all_tied, "threshold": check_mask_threshold_ties}

    def run(bufs, sizes, **kw):
        return _run(backend, _on(device, bufs), sizes, **kw)

    checks[check](run, alpha_by, DTYPE_BY_ID[dtype], seed)


def case_stats_bits(backend: str, device: str, *, dtype: str, seed: int):
    """Pass 1 gives the same bits on every call: a segment over 5 chunks, one of exactly
    one chunk, an empty one."""
    sizes = [5000, 1, 999, 0, 8, 1024]
    layout = mk.get_layout(sizes, device, chunk=1024)
    bufs = make_buffers(sizes, DTYPE_BY_ID[dtype], seed=seed)
    dev = _on(device, bufs)
    first = mk.segment_gram(*dev, layout, backend=backend)
    assert first.dtype == torch.float32 and first.shape == (len(sizes), 10)
    for _ in range(2):
        assert torch.equal(mk.segment_gram(*dev, layout, backend=backend), first)
    assert_stats_close(first, bufs, sizes)
    assert torch.equal(first[3].cpu(), torch.zeros(10)), "an empty segment has zero statistics"


def case_empty(backend: str, device: str, *, dtype: str, seed: int):
    """Empty segments, alone and among others: zero statistics, the op still runs."""
    for sizes in ([0], [0, 0], [3, 0, 5]):
        bufs = make_buffers(sizes, DTYPE_BY_ID[dtype], seed=seed)
        dev = _on(device, bufs)
        stats = mk.segment_gram(*dev, sizes, backend=backend)
        assert_stats_close(stats, bufs, sizes)
        for s, n in enumerate(sizes):
            if n == 0:
                assert torch.equal(stats[s].cpu(), torch.zeros(10))
        kw = dict(mode="gm", alpha=0.5)
        d, _ = _run(backend, dev, sizes, **kw)
        assert_direction_close(d, oracle(bufs, sizes, **kw), bufs, sizes)


def case_coeff_rules(backend: str, device: str, *, dtype: str, seed: int):
    """Pass 2: a zero coefficient is not read (a NaN there cannot leak); the row
    (1, 0, 0, 0) keeps g_theta's bits; (0, 0, 0, 0) writes zeros."""
    sizes = [13, 1, 130, 64, 9, 1030]
    bufs = make_buffers(sizes, DTYPE_BY_ID[dtype], seed=seed)
    lo = [0]
    for n in sizes:
        lo.append(lo[-1] + n)
    nan = float("nan")
    bufs[0][lo[0] : lo[1]] = nan  # segment 0: identity row, NaN bits must stay
    for b in bufs:
        b[lo[1] : lo[2]] = nan  # segment 1: masked-out gm row, zeros without reading
    for b in bufs[2:]:
        b[lo[2] : lo[3]] = nan  # segment 2: gm row (1, 1, 0, 0)
    bufs[1][lo[3] : lo[4]] = nan  # segment 3: (2, 0, -0.5, 0.25), ht not read
    coeffs = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 1.0, 0.0, 0.0],
            [2.0, 0.0, -0.5, 0.25],
            [0.0, 0.0, 0.0, -3.0],
            [0.7, -1.3, 0.4, 2.2],
        ]
    )
    out = _on(device, bufs)
    mk.segment_combine_(*out, sizes, coeffs.to(device), backend=backend)
    for before, after in zip(bufs[1:], out[1:]):
        assert same_bits(before, after.cpu()), "only g_theta may be written"
    d = out[0].cpu()
    assert same_bits(d[lo[0] : lo[1]], bufs[0][lo[0] : lo[1]]), "(1,0,0,0) must keep the bits"
    assert torch.equal(d[lo[1] : lo[2]], torch.zeros(1, dtype=d.dtype)), "(0,0,0,0) writes zeros"
    assert d[lo[1] :].isfinite().all(), "a buffer with coefficient 0 was read (NaN leaked)"
    assert_combine_close(
        d[lo[2] :],
        [b[lo[2] :] for b in bufs],
        sizes[2:],
        coeffs[2:],
        truncates=interpreter_truncates(backend, device, d.dtype),
    )


def case_masked_keep(backend: str, device: str, *, align: str, dtype: str, seed: int):
    """masked='keep': dropped segments keep g_theta's bits, selected ones get the
    bits of the default masked='zero' (Eq. 12, checked against the oracle there)."""
    sizes = MASKED_SIZES
    kw = dict(mode="gm", alpha=0.3, align=align == "align")
    bufs = make_buffers(sizes, DTYPE_BY_ID[dtype], seed=seed)
    dev = _on(device, bufs)
    d, res = _run(backend, dev, sizes, masked="keep", **kw)
    assert_mask_matches(res, oracle(bufs, sizes, **kw), sizes, 0.3, "elements")
    keep = torch.repeat_interleave(res.mask.cpu(), torch.tensor(sizes)).to(device)
    assert same_bits(d[~keep], dev[0][~keep]), "a dropped segment was written"
    zero, _ = _run(backend, dev, sizes, **kw)
    assert same_bits(zero[keep], d[keep]) and not zero[~keep].any()


def case_scale(backend: str, device: str, *, mode: str, dtype: str, seed: int):
    """A power-of-two scale commutes with every rounding: the bits of scale * d, except
    where scale * d falls below the dtype's normal range (fp16 subnormals round). The
    bound is strict: a scaled value equal to the smallest normal can come from a
    float32 ``scale * d`` just below it, which rounds on the subnormal grid."""
    sizes, kw, dt = SCALE_SIZES, MODES[mode], DTYPE_BY_ID[dtype]
    dev = _on(device, make_buffers(sizes, dt, seed=seed))
    plain, res = _run(backend, dev, sizes, **kw)
    scaled, res_s = _run(backend, dev, sizes, scale=0.25, **kw)
    want = plain * 0.25
    normal = want.abs() > torch.finfo(dt).tiny
    assert torch.equal(scaled[normal], want[normal])
    assert ((scaled - want)[~normal].abs() <= torch.finfo(dt).tiny).all()
    assert torch.equal(res_s.cos, res.cos) and torch.equal(res_s.mask, res.mask)
    if kw["mode"] == "gm":  # dropped segments keep g_theta's bits, selected ones are scaled
        kept, _ = _run(backend, dev, sizes, scale=0.25, masked="keep", **kw)
        keep = torch.repeat_interleave(res.mask.cpu(), torch.tensor(sizes)).to(device)
        assert torch.equal(kept[keep], scaled[keep]) and torch.equal(kept[~keep], dev[0][~keep])


# ====================================================================== opcheck


def opcheck_ops(gram_op, combine_op, device: str, dtype: torch.dtype, sizes=(5, 1, 70, 33)) -> None:
    """``torch.library.opcheck`` of one backend's two registered ops (schemas, fake
    kernels, mutation, autograd registration) on the layout of ``sizes``."""
    bufs = make_buffers(sizes, dtype, seed=11, device=device)
    layout = mk.get_layout(sizes, device)
    torch.library.opcheck(gram_op, (*bufs, layout.chunks, layout.chunk_ptr))
    coeffs = torch.randn(layout.num_segments, 4, device=device)
    torch.library.opcheck(combine_op, (*[b.clone() for b in bufs], layout.chunks, coeffs))
