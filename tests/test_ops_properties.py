"""Property-based tests of the public ops against the float64 oracle (hypothesis).

Hypothesis draws the segment structure (1 to 2,000 segments of 0 to 200K elements,
straddling the 64K chunk boundary), the dtype, the magnitudes (per segment, over the
dtype's whole range), the geometry (zero h, zero g_phi, g parallel to h, theta = phi,
exactly tied cosines, subnormals) and every op option; every backend that runs on CPU
in this process (``cpu``, ``torch``, and ``triton`` under ``TRITON_INTERPRET=1``) is
compared with :mod:`mdgd_kernels.reference` under the tolerance model of docs/testing.md.
The default profile is CI's; ``--hypothesis-profile=deep`` runs 10,000 examples.
"""

from __future__ import annotations

import math

import pytest
import tolerances
import torch
from conftest import (
    TOL,
    assert_cos_close,
    assert_mask_matches,
    assert_stats_close,
    cos_tolerance,
    oracle,
    stats_roundoff,
    tied_buffers,
)
from hypothesis import given
from hypothesis import strategies as st

import mdgd_kernels as mk
from mdgd_kernels.layout import CHUNK
from mdgd_kernels.reference import ReferenceResult, reference_top_alpha

BACKENDS = mk.available_backends("cpu")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GEOMETRIES = ("random", "zero_h", "zero_g_phi", "parallel", "theta_eq_phi", "subnormal")
F32_MAX = torch.finfo(torch.float32).max
SUB32 = 2.0**-149  # float32's smallest subnormal: a product below it is lost
EPS = 1e-6  # the ops' default degeneracy threshold


# ------------------------------------------------------------------------------ strategies


@st.composite
def layouts(draw) -> list[int]:
    """Segment sizes: a few small, many tiny, around the chunk boundary, or a few large."""
    shape = draw(st.sampled_from(["small", "small", "many", "chunk", "large"]))
    if shape == "small":
        return draw(st.lists(st.integers(0, 300), min_size=1, max_size=24))
    if shape == "many":
        n, seed = draw(st.integers(100, 2000)), draw(st.integers(0, 2**31))
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, 40, (n,), generator=gen).tolist()
    if shape == "chunk":
        near = st.sampled_from([CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 7]) | st.integers(0, 999)
        return draw(st.lists(near, min_size=1, max_size=4))
    return draw(st.lists(st.integers(0, 200_000), min_size=1, max_size=2))


@st.composite
def options(draw) -> dict:
    """Every mode and option of ``mdgd_direction_``."""
    mode = draw(st.sampled_from(["mdgd", "gm", "ft"]))
    kw = dict(mode=mode, align=draw(st.booleans()))
    if mode == "gm":
        kw["alpha"] = draw(st.sampled_from([1.0, 0.5, 0.1, 1e-3]) | st.floats(1e-4, 1.0))
        kw["alpha_by"] = draw(st.sampled_from(["elements", "segments"]))
        kw["masked"] = draw(st.sampled_from(["zero", "keep"]))
    kw["scale"] = draw(st.sampled_from([1.0, 0.25, 1 / 3, 8.0]))
    kw["nonfinite"] = draw(st.sampled_from(["skip", "raise"]))
    return kw


@st.composite
def magnitudes(draw, dtype: torch.dtype) -> tuple[float, float]:
    """A range of log2 magnitudes: moderate, anywhere in the dtype's range, or at an end."""
    lo, hi = math.log2(torch.finfo(dtype).tiny), math.log2(torch.finfo(dtype).max)
    regime = draw(st.sampled_from(["moderate", "moderate", "wide", "top", "bottom"]))
    if regime == "moderate":
        return -10.0, 10.0
    if regime == "wide":
        a, b = sorted(draw(st.tuples(st.floats(lo, hi), st.floats(lo, hi))))
        return a, b
    if regime == "top":
        return hi - 8, hi - 1
    return lo, lo + 8


@st.composite
def problems(draw):
    """(buffers, sizes) of one generated problem."""
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    seed = draw(st.integers(0, 2**31))
    geometry = draw(st.sampled_from(GEOMETRIES + ("tied", "mixed")))
    if geometry == "tied":
        n = draw(st.integers(1, 300))
        patterns = draw(st.lists(st.integers(0, 3), min_size=1, max_size=40))
        return tied_buffers(patterns, [n] * len(patterns), dtype, seed), [n] * len(patterns)
    sizes = draw(layouts())
    mags = draw(magnitudes(dtype))
    h_shift = draw(st.integers(-24, 4))  # |h| relative to |g|, in powers of two
    return build_buffers(sizes, dtype, geometry, mags, h_shift, seed), sizes


def build_buffers(sizes, dtype, geometry, mags, h_shift, seed) -> list[torch.Tensor]:
    """Four buffers; each segment has its own magnitude and (if ``mixed``) geometry."""
    gen = torch.Generator().manual_seed(seed)
    parts = [_segment(n, dtype, _pick(geometry, gen), mags, h_shift, gen) for n in sizes]
    big = torch.finfo(dtype).max
    return [
        torch.cat([p[i] for p in parts]).clamp(-big, big).to(dtype).contiguous() for i in range(4)
    ]


def _pick(geometry: str, gen: torch.Generator) -> str:
    if geometry != "mixed":
        return geometry
    return GEOMETRIES[int(torch.randint(0, len(GEOMETRIES), (1,), generator=gen))]


def _segment(n, dtype, geometry, mags, h_shift, gen) -> list[torch.Tensor]:
    lo, hi = mags
    scale = 2.0 ** (lo + (hi - lo) * float(torch.rand((), generator=gen)))
    if geometry == "subnormal":  # within the dtype's subnormal range
        scale = torch.finfo(dtype).tiny * 2.0 ** -float(torch.randint(1, 8, (1,), generator=gen))
    gt, ht, gp, hp = (torch.randn(n, generator=gen, dtype=torch.float64) * scale for _ in "abcd")
    ht, hp = ht * 2.0**h_shift + 0.3 * gt, hp * 2.0**h_shift + 0.3 * ht  # correlated, as real
    gp = gp + 0.5 * gt
    if geometry == "zero_h":
        ht, hp = torch.zeros_like(ht), torch.zeros_like(hp)
    elif geometry == "zero_g_phi":
        gp = torch.zeros_like(gp)
    elif geometry == "parallel":  # powers of two: exactly parallel after the cast
        gt, gp = -2.0 * ht, 0.5 * hp
    elif geometry == "theta_eq_phi":  # the first step: phi's gradients are theta's
        gp, hp = gt.clone(), ht.clone()
    return [gt, ht, gp, hp]


# ------------------------------------------------------------------------ tolerance model


def segment_roundoff(ref: ReferenceResult, sizes) -> torch.Tensor:
    """Relative error bound of each segment's float32 statistics: the blocked sums'
    rounding, plus the products lost below float32's subnormals (``n * 2**-149``
    absolute, relative to the smallest nonzero squared norm of the segment)."""
    diag = ref.stats[:, [0, 2, 3, 5]]
    smallest = torch.where(diag > 0, diag, torch.full_like(diag, math.inf)).min(1).values
    n = torch.tensor([max(int(s), 1) for s in sizes], dtype=torch.float64)
    return stats_roundoff(sizes) + n * SUB32 / smallest


def overflow_bounds(ref: ReferenceResult, sizes) -> tuple[bool, bool]:
    """(must skip, may skip): float32 statistics overflow where the float64 ones pass
    float32's maximum (either way within their rounding)."""
    u = stats_roundoff(sizes)
    top = ref.stats[:, [0, 2, 3, 5]].max(1).values
    return bool((top > F32_MAX * (1 + u)).any()), bool((top > F32_MAX * (1 - u)).any())


def degenerate_band(ref: ReferenceResult, u: torch.Tensor) -> torch.Tensor:
    """Segments whose degeneracy test (projected norm <= eps * norm) is within the
    statistics' rounding (``3u`` of the norm) of its threshold: either answer is right."""
    return tolerances.degenerate_band(ref.stats, u, EPS)


def check_coefficients(res, ref: ReferenceResult, sizes, u, band) -> torch.Tensor:
    """s_theta, s_phi, k and cos against the oracle, within the segment's conditioning
    (tests/helpers/tolerances.py). Returns the cos tolerance per segment (the mask check's)."""
    s_theta, s_phi, _, _ = tolerances.projections(ref.stats)
    for got, want, which in ((res.s_theta, s_theta, "theta"), (res.s_phi, s_phi, "phi")):
        tol = tolerances.s_bound(ref.stats, u, which) + U_OUT * want.abs()
        _assert_within(got, want, tol, "s_theta/s_phi")
    tol = cos_tolerance(ref, sizes, u)
    tol = torch.where(band, 2.0 + tol, tol)  # either side of the threshold: any cos
    assert_cos_close(res.cos, ref, sizes, tol=tol)
    k_tol = tolerances.k_bound(ref.stats, ref.k, u, U_OUT)
    k = res.k.to(torch.float64).cpu()
    assert k.isfinite().all(), "k must be finite"
    _assert_within(k, ref.k, torch.where(band, math.inf, k_tol), "k")
    return tol


U_OUT = 2.0**-23  # the coefficients' rounding to float32


def _assert_within(got, want, tol, what: str) -> None:
    err = (got.to(torch.float64).cpu() - want).abs()
    bad = ~(err <= tol)
    assert not bad.any(), (
        f"{what} differs from the oracle at segments {torch.nonzero(bad).flatten()[:5].tolist()}:"
        f" got {got[bad][:5].tolist()} want {want[bad][:5].tolist()} tol {tol[bad][:5].tolist()}"
    )


def own_coefficients(res, sizes, kw) -> torch.Tensor:
    """The ``[S, 4]`` float64 rows pass 2 must apply, from the backend's own k, s_phi
    and mask (each checked against the oracle separately)."""
    k, s_p = res.k.double().cpu(), res.s_phi.double().cpu()
    one, zero = torch.ones_like(k), torch.zeros_like(k)
    a = one if kw["align"] else zero
    if kw["mode"] == "mdgd":
        return torch.stack([one, a, k, -k * s_p], 1) * kw["scale"]
    if kw["mode"] == "ft":
        return torch.stack([one, zero, zero, zero], 1) * kw["scale"]
    m = res.mask.cpu().double()
    rows = torch.stack([m, m * a, zero, zero], 1) * kw["scale"]
    if kw["masked"] == "keep":
        rows[~res.mask.cpu()] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    return rows


def check_direction(d, bufs, sizes, rows) -> None:
    """Pass 2: ``d = c1*gt + c2*ht + c3*gp + c4*hp`` in float32, rounded once to the
    dtype; beyond the dtype's range it rounds to inf, and below its normals inputs and
    results may flush to zero."""
    dtype = d.dtype
    xs = [b.double().cpu() for b in bufs]
    reps = torch.tensor(sizes)
    want = sum(torch.repeat_interleave(rows[:, i], reps) * xs[i] for i in range(4))
    seg_max = [
        torch.repeat_interleave(
            torch.stack([x.abs().max() if x.numel() else x.new_zeros(()) for x in x_i.split(sizes)])
            if sizes
            else torch.zeros(0, dtype=torch.float64),
            reps,
        )
        for x_i in xs
    ]
    scale = sum(torch.repeat_interleave(rows[:, i].abs(), reps) * seg_max[i] for i in range(4))
    fi = torch.finfo(dtype)
    edge = fi.max * (1 + fi.eps / 2)  # the rounding threshold to inf
    got = d.double().cpu().clamp(-edge, edge)
    err = (got - want.clamp(-edge, edge)).abs()
    # inputs and results below the smallest normal may be flushed to zero (FTZ / DAZ)
    flush = fi.tiny * (1 + torch.repeat_interleave(rows.abs().sum(1), reps))
    bad = ~(err <= TOL[dtype] * scale + flush)
    assert not bad.any(), (
        f"{int(bad.sum())} elements of d differ beyond the tolerance; first at "
        f"{torch.nonzero(bad)[:3].flatten().tolist()}: got {got[bad][:3].tolist()} "
        f"want {want[bad][:3].tolist()}"
    )


# ---------------------------------------------------------------------------- the property


def run_backend(bufs, sizes, backend, kw):
    """The op on copies of ``bufs``; (direction, result or None if it skipped/raised)."""
    out = [b.clone() for b in bufs]
    try:
        res = mk.mdgd_direction_(*out, sizes, backend=backend, **kw)
    except FloatingPointError:
        assert kw["nonfinite"] == "raise"
        res = None
    for before, after in zip(bufs[1:], out[1:]):
        assert _bits(before) == _bits(after), "only g_theta may be written"
    if res is not None and bool(res.skipped):
        assert kw["nonfinite"] == "skip"
        res = None
    return out[0], res


def _bits(x: torch.Tensor) -> bytes:
    return x.view(torch.int16 if x.element_size() == 2 else torch.int32).numpy().tobytes()


def check_backends(bufs, sizes, backends, kw) -> None:
    """Every backend in ``backends`` against one oracle run."""
    ref_kw = {k: v for k, v in kw.items() if k in ("mode", "alpha", "align", "alpha_by")}
    ref = oracle(bufs, sizes, **ref_kw)
    for backend in backends:
        check_backend(bufs, sizes, backend, kw, ref)


def check_backend(bufs, sizes, backend, kw, ref: ReferenceResult) -> None:
    d, res = run_backend(bufs, sizes, backend, kw)
    must_skip, may_skip = overflow_bounds(ref, sizes)
    if res is None:  # skipped or raised: statistics overflowed float32, nothing written
        assert may_skip, f"{backend} skipped a step whose statistics fit float32"
        assert _bits(d) == _bits(bufs[0]), "a skipped step must leave g_theta's bits"
        return
    assert not must_skip, f"{backend} did not flag statistics that overflow float32"
    assert_stats_close(res.stats, bufs, sizes)
    u = segment_roundoff(ref, sizes)
    band = degenerate_band(ref, u)
    tol = check_coefficients(res, ref, sizes, u, band)
    assert (res.cos.abs() <= 1).all(), "a cosine outside [-1, 1]"
    if kw["mode"] == "gm" and (tol < 1).all():
        assert_mask_matches(res, ref, sizes, kw["alpha"], kw["alpha_by"], tol=tol)
    elif kw["mode"] == "gm":  # a segment of any cos may take or free budget: the rule only
        weights = list(sizes) if kw["alpha_by"] == "elements" else [1] * len(sizes)
        own = reference_top_alpha(res.cos.double().cpu(), weights, kw["alpha"])
        assert torch.equal(res.mask.cpu(), own), "the mask does not follow the rule on its cos"
    check_direction(d, bufs, sizes, own_coefficients(res, sizes, kw))


@given(problem=problems(), kw=options())
def test_every_backend_matches_the_oracle(problem, kw):
    bufs, sizes = problem
    check_backends(bufs, sizes, BACKENDS, kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_empty_segments(backend):
    kw = dict(mode="gm", alpha=0.5, alpha_by="elements", align=True, masked="zero", scale=1.0)
    check_backends(
        [torch.zeros(0) for _ in range(4)], [0, 0, 0], [backend], kw | {"nonfinite": "raise"}
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_gm_ties_at_theta_eq_phi_follow_the_reported_cos(backend):
    """Found by the deep profile: at theta = phi the float64 cos are 1 +- 1e-16, and the
    mask ranked that noise, not the float32 cos it reports (all exactly 1.0): it kept
    a later segment before an earlier tied one. Ties must go to the lower index."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        gt, ht = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
        bufs = [gt, ht, gt.clone(), ht.clone()]
        res = mk.mdgd_direction_(*bufs, [2, 2], mode="gm", alpha=0.5, backend=backend)
        assert torch.equal(res.cos, torch.ones(2))
        assert res.mask.tolist() == [True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_element_segments_with_zero_h_phi(backend):
    """Found by the deep profile (a tolerance-model case, not a kernel bug): in a one-element
    segment g_theta is parallel to h_theta, so gbar_theta = 0 and the oracle's k is 0 while
    the backend's is float64 noise (1e-17); k's bound scales with sqrt(gt.gt * gp.gp)."""
    gen = torch.Generator().manual_seed(0)
    bufs = [torch.randn(64, generator=gen).half() for _ in range(3)] + [torch.zeros(64).half()]
    kw = dict(mode="mdgd", align=False, scale=1.0, nonfinite="skip")
    check_backends(bufs, [1] * 64, [backend], kw)


def test_cos_stays_in_range_when_rounded_statistics_break_cauchy_schwarz():
    """Found by the deep profile: float32 statistics of vectors near 1e-19 (products
    underflow) gave cos = 4.28, which MDGD-GM would rank above every true cosine. Here
    gt.gp = 4 with |gt| = |gp| = 1, as rounding can leave it."""
    stats = torch.tensor(
        [[1.0, 0, 0, 1.0, 0, 0, 4.0, 0, 0, 0], [1.0, 0, 0, 1.0, 0, 0, -4.0, 0, 0, 0]]
    )
    coef = mk.coefficients(stats, torch.tensor([3, 3]), mode="gm", alpha=0.5)
    assert coef.cos.tolist() == [1.0, -1.0]
