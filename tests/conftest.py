"""Shared test fixtures: the tolerance table, input builders and comparisons.

Every backend is compared with the float64 oracle in :mod:`mdgd_kernels.reference` on
fresh random inputs. Each segment gets its own magnitude (10**U(-3, 3)) so that
an indexing bug that mixes segments cannot hide inside a tolerance.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# tests/helpers/ holds the modules that are not tests (builders, workers, case lists)
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from hypothesis_profiles import register_profiles  # noqa: E402
from tolerances import cos_bound, half_spacing, stats_roundoff  # noqa: E402

from mdgd_kernels.reference import (
    ReferenceResult,
    reference_direction,
    reference_gram,
    reference_top_alpha,
)

register_profiles()


def pytest_configure(config):
    """The data-index cache of ``mdgd train`` goes to a folder of this session (subprocesses
    inherit it), not the user's ~/.cache."""
    if not os.environ.get("MDGD_DATA_CACHE"):
        import tempfile

        os.environ["MDGD_DATA_CACHE"] = tempfile.mkdtemp(prefix="mdgd-data-cache-")


# One tolerance table for every op test: relative to the scale of the terms of
# each segment. The direction is computed in float32 and rounded once to the
# buffer dtype, so the dtype's rounding dominates below float32.
TOL = {
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
STATS_RTOL = 2e-5  # statistics: relative to sqrt(a.a * b.b), every dtype (inputs are exact in fp32)
COS_ATOL = 1e-4  # cos of a well-conditioned segment; see cos_tolerance for the rest

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CASES = ("random", "zero_h", "zero_g_phi", "parallel", "nan", "inf")
# every mode and option combination of the op, by test id
MODES = {
    "mdgd": dict(mode="mdgd"),
    "mdgd-noalign": dict(mode="mdgd", align=False),
    "gm-a0.1": dict(mode="gm", alpha=0.1),
    "gm-a0.5-segments": dict(mode="gm", alpha=0.5, alpha_by="segments"),
    "gm-a1.0": dict(mode="gm", alpha=1.0),
    "gm-a0.3-noalign": dict(mode="gm", alpha=0.3, align=False),
    "ft": dict(mode="ft"),
}

_PAIRS = ((0, 0), (0, 1), (1, 1), (2, 2), (2, 3), (3, 3), (0, 2), (0, 3), (1, 2), (1, 3))


def make_buffers(
    sizes, dtype=torch.float32, case: str = "random", *, seed: int, device="cpu"
) -> list[torch.Tensor]:
    """Four flat buffers (gt, ht, gp, hp) with a distinct magnitude per segment, drawn
    from ``seed`` (the ``seed`` fixture's, so a failure names it)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    scale = torch.cat(
        [torch.full((s,), 10.0 ** (6 * torch.rand((), generator=gen).item() - 3)) for s in sizes]
    )
    bufs = [torch.randn(n, generator=gen, dtype=torch.float64) * scale for _ in range(4)]
    # correlate the gradients a little, as real ones are, so the projections matter
    bufs[1] += 0.3 * bufs[0]
    bufs[2] += 0.5 * bufs[0]
    bufs[3] += 0.3 * bufs[1]
    if case == "zero_h":
        bufs[1].zero_()
        bufs[3].zero_()
    elif case == "zero_g_phi":
        bufs[2].zero_()
    elif case == "parallel":
        # powers of two, so the dtype cast keeps the vectors exactly parallel
        bufs[0] = -2.0 * bufs[1]
        bufs[2] = 0.5 * bufs[3]
    elif case in ("nan", "inf"):
        pos = int(torch.randint(0, n, (1,), generator=gen))
        which = int(torch.randint(0, 4, (1,), generator=gen))
        bufs[which][pos] = float("nan") if case == "nan" else float("-inf")
    elif case != "random":
        raise ValueError(case)
    return [b.to(dtype).to(device).contiguous() for b in bufs]


AS_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(x: torch.Tensor) -> torch.Tensor:
    """``x``'s bits as integers: compares NaN payloads and the sign of zero too."""
    return x.view(AS_INT[x.dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(bits(a), bits(b))


def assert_stats_close(stats: torch.Tensor, bufs, sizes) -> None:
    ref = reference_gram(*bufs, sizes)
    got = stats.to(torch.float64).cpu()
    diag = ref[:, [0, 2, 2, 3, 5, 5, 0, 0, 2, 2]], ref[:, [0, 0, 2, 3, 3, 5, 3, 5, 3, 5]]
    scale = (diag[0] * diag[1]).sqrt()
    err = (got - ref).abs()
    bad = err > STATS_RTOL * scale + 1e-30
    assert not bad.any(), (
        f"statistics differ from the oracle at (segment, column) "
        f"{torch.nonzero(bad)[:5].tolist()}: got {got[bad][:5].tolist()} "
        f"want {ref[bad][:5].tolist()}"
    )


def term_scale(ref: ReferenceResult, bufs, sizes) -> torch.Tensor:
    """Per-element scale of the terms of d: sum_i |c_i| * max|x_i| over its segment."""
    out = []
    for s, cf, *xs in zip(
        range(len(sizes)), ref.coeffs, *(torch.split(b.double().cpu(), list(sizes)) for b in bufs)
    ):
        mags = [x.abs().max() if x.numel() else torch.zeros((), dtype=torch.float64) for x in xs]
        out.append(torch.full((sizes[s],), float(sum(abs(c) * m for c, m in zip(cf, mags)))))
    return torch.cat(out)


def assert_direction_close(d: torch.Tensor, ref: ReferenceResult, bufs, sizes) -> None:
    """d within ``TOL[dtype]`` of its terms' scale, plus half the dtype's subnormal
    spacing: d is rounded once to the dtype, and a result below the smallest normal
    rounds on a fixed grid (2**-24 for fp16), an absolute error however small the terms."""
    tol = TOL[d.dtype]
    got = d.to(torch.float64).cpu()
    scale = term_scale(ref, bufs, sizes)
    err = (got - ref.direction).abs()
    bound = tol * scale + half_spacing(torch.zeros(()), d.dtype)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{int(bad.sum())} elements of d differ from the oracle beyond {tol} x scale; first at "
        f"{torch.nonzero(bad)[:3].flatten().tolist()}: got {got[bad][:3].tolist()} "
        f"want {ref.direction[bad][:3].tolist()} |diff| {err[bad][:3].tolist()} "
        f"bound {bound[bad][:3].tolist()}"
    )


def cos_tolerance(ref: ReferenceResult, sizes, u: torch.Tensor | None = None) -> torch.Tensor:
    """Per-segment bound on |cos - cos_oracle| for cos computed from float32 statistics.

    The projected norms are differences, ``|gbar|^2 = g.g - s*g.h``: when g is
    nearly parallel to h (``kappa = g.g / |gbar|^2`` large; it happens in short
    segments), the float32 rounding of the statistics, ``u`` relative, becomes
    ``u * kappa`` relative in ``|gbar|^2`` and so in ``cos``. Every statistic
    enters ``gbar_theta . gbar_phi`` through terms bounded by
    ``sqrt(gt.gt * gp.gp)`` (Cauchy-Schwarz), hence the ``sqrt(kt * kp)`` term.
    ``u`` grows with the length summed (log2 n: blocked float32 sums); pass a
    per-segment ``u`` to widen it (e.g. for statistics that underflow float32).
    """
    if u is None:
        u = stats_roundoff(sizes)
    return cos_bound(ref.stats, u, COS_ATOL)


def assert_cos_close(cos: torch.Tensor, ref: ReferenceResult, sizes, tol=None) -> None:
    got = cos.to(torch.float64).cpu()
    tol = cos_tolerance(ref, sizes) if tol is None else tol
    bad = (got - ref.cos).abs() > tol
    assert not bad.any(), (
        f"cos differs from the oracle at segments {torch.nonzero(bad).flatten()[:5].tolist()}: "
        f"got {got[bad][:5].tolist()} want {ref.cos[bad][:5].tolist()} "
        f"(tolerance {tol[bad][:5].tolist()})"
    )


def assert_mask_matches(
    res, ref: ReferenceResult, sizes, alpha: float, alpha_by: str, tol=None
) -> None:
    """The top-alpha mask, exactly.

    It must be the rule of docs/math.md §6 applied to the backend's own ``cos`` (compared
    bit for bit), and equal to the oracle's mask on every segment whose oracle
    ``cos`` is farther from the oracle's threshold than its cos tolerance (an
    ill-conditioned segment next to the threshold may rank either way). ``tol``
    overrides the per-segment cos tolerance.
    """
    weights = list(sizes) if alpha_by == "elements" else [1] * len(sizes)
    mask = res.mask.cpu()
    own = reference_top_alpha(res.cos.to(torch.float64).cpu(), weights, alpha)
    assert torch.equal(mask, own), "the mask does not follow the top-alpha rule on its own cos"
    threshold = ref.cos[ref.mask].min()
    tol = cos_tolerance(ref, sizes) if tol is None else tol
    clear = (ref.cos - threshold).abs() > tol
    assert torch.equal(mask[clear], ref.mask[clear]), "top-alpha masks differ from the oracle"


def oracle(bufs, sizes, **kw) -> ReferenceResult:
    return reference_direction(*bufs, sizes, **kw)


SEED_ENV = "MDGD_TEST_SEED"
_SEED = pytest.StashKey[int]()


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test, or ``MDGD_TEST_SEED``'s to rerun one: a failing test's
    report names its seed and the command that reruns it (:func:`pytest_runtest_makereport`)."""
    env = os.environ.get(SEED_ENV)
    s = int(env) if env else int.from_bytes(os.urandom(4), "little")
    request.node.stash[_SEED] = s
    print(f"seed={s}")
    return s


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Add the seed of a failing test that drew one, and how to rerun it with that seed."""
    report = yield
    s = item.stash.get(_SEED, None)
    if s is not None and report.failed:
        rerun = f"{SEED_ENV}={s} python -m pytest '{item.nodeid}'"
        report.sections.append(("random seed", f"seed={s}; rerun with: {rerun}"))
    return report


@pytest.fixture(autouse=True)
def _global_rng():
    """torch's global generator starts from the same state in every test, so whatever
    draws from it (``torch.randn`` without a generator) is fixed per case, whatever ran
    before or was deselected."""
    torch.manual_seed(0)


# ---------------------------------------------------------------------- exact ties of cos


def tied_buffers(patterns, lengths, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Buffers whose segment ``s`` copies integer pattern ``patterns[s]`` at length
    ``lengths[s]``: segments of one pattern and length have bit-identical
    statistics (every product and sum of small integers is exact in float32) and so
    exactly tied ``cos`` in every backend and in the oracle. Patterns differ in
    ``g_phi = g_theta + j * v`` (pattern ``j``), so distinct patterns have distinct cos;
    pattern 0 has ``h = 0`` and ``g_phi = g_theta``: cos exactly 1, as at theta = phi.
    """
    gen = torch.Generator().manual_seed(seed)
    protos = {}
    for j, n in zip(patterns, lengths):
        if (j, n) in protos:
            continue
        sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        u = sign * torch.randint(1, 4, (n,), generator=gen)  # no zero: never degenerate
        w = torch.randint(-2, 3, (n,), generator=gen) * (j != 0)
        v = torch.randint(-2, 3, (n,), generator=gen)
        protos[j, n] = [u, w, u + j * v, w]
    segs = [protos[j, n] for j, n in zip(patterns, lengths)]
    return [torch.cat([x[i] for x in segs]).to(dtype).contiguous() for i in range(4)]


def prefix_mask(order: list[int], weights: list[int], alpha: float) -> torch.Tensor:
    """The mask written out for a known visiting order: keep segments until ``alpha``."""
    mask = torch.zeros(len(weights), dtype=torch.bool)
    kept = 0
    for s in order:
        if kept >= alpha * sum(weights):
            break
        mask[s] = True
        kept += weights[s]
    return mask


def check_mask_all_tied(run, alpha_by: str, dtype, seed: int) -> None:
    """theta = phi: every cos is exactly 1, and MDGD-GM keeps alpha (plus at most one
    segment), the lowest-index segments first. ``run(bufs, sizes, **kw) -> (d, res)``."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 200, (40,), generator=gen).tolist()
    bufs = tied_buffers([0] * len(sizes), sizes, dtype, seed)
    kw = dict(mode="gm", alpha=0.1, alpha_by=alpha_by)
    d, res = run(bufs, sizes, **kw)
    assert torch.equal(res.cos.cpu(), torch.ones(len(sizes))), "every cos must be exactly 1"
    weights = sizes if alpha_by == "elements" else [1] * len(sizes)
    want = prefix_mask(list(range(len(sizes))), weights, 0.1)
    kept = sum(w for w, m in zip(weights, want.tolist()) if m)
    assert 0.1 * sum(weights) <= kept < 0.1 * sum(weights) + max(weights)
    assert torch.equal(res.mask.cpu(), want), f"kept {res.mask.tolist()}, want {want.tolist()}"
    ref = oracle(bufs, sizes, **kw)
    assert torch.equal(ref.mask, want), "the oracle's mask breaks the budget"
    assert_direction_close(d, ref, bufs, sizes)


def check_mask_threshold_ties(run, alpha_by: str, dtype, seed: int) -> None:
    """Four groups of four exactly tied segments; alpha ends inside the second group,
    which keeps its two lowest-index segments and no more."""
    gen = torch.Generator().manual_seed(seed)
    patterns = (torch.randperm(16, generator=gen) % 4).tolist()
    sizes = [10 + 7 * j for j in patterns]
    bufs = tied_buffers(patterns, sizes, dtype, seed)
    weights = sizes if alpha_by == "elements" else [1] * len(sizes)
    ref = oracle(bufs, sizes, mode="gm", alpha=1.0)
    rep = {j: patterns.index(j) for j in range(4)}
    groups = sorted(range(4), key=lambda j: -float(ref.cos[rep[j]]))
    members = {j: [s for s, p in enumerate(patterns) if p == j] for j in range(4)}
    order = [s for j in groups for s in members[j]]
    first, second = members[groups[0]], members[groups[1]]
    target = sum(weights[s] for s in first) + 1.5 * weights[second[0]]
    alpha = target / sum(weights)
    kw = dict(mode="gm", alpha=alpha, alpha_by=alpha_by)
    d, res = run(bufs, sizes, **kw)
    cos = res.cos.cpu()
    for j in range(4):
        assert torch.unique(cos[members[j]]).numel() == 1, f"pattern {j}'s cos do not tie"
    got_groups = sorted(range(4), key=lambda j: -float(cos[rep[j]]))
    assert got_groups == groups, "the backend ranks the patterns unlike the oracle"
    want = prefix_mask(order, weights, alpha)
    assert want[first].all() and want[second].tolist() == [True, True, False, False]
    assert torch.equal(res.mask.cpu(), want), f"kept {res.mask.tolist()}, want {want.tolist()}"
    ref = oracle(bufs, sizes, **kw)
    assert torch.equal(ref.mask, want)
    assert_direction_close(d, ref, bufs, sizes)
