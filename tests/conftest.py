"""Shared test fixtures: the tolerance table, input builders and comparisons.

Every backend is compared with the float64 oracle in :mod:`mdgd.reference` on
fresh random inputs. Each segment gets its own magnitude (10**U(-3, 3)) so that
an indexing bug that mixes segments cannot hide inside a tolerance.
"""

from __future__ import annotations

import os

import pytest
import torch

from mdgd.reference import (
    ReferenceResult,
    reference_direction,
    reference_gram,
    reference_top_alpha,
)

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
U32 = 2.0**-24  # float32 unit roundoff: the statistics are float32 (spec section 3)

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
    sizes, dtype=torch.float32, case: str = "random", seed: int | None = None, device="cpu"
) -> list[torch.Tensor]:
    """Four flat buffers (gt, ht, gp, hp) with a distinct magnitude per segment."""
    gen = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4)))
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
    tol = TOL[d.dtype]
    got = d.to(torch.float64).cpu()
    scale = term_scale(ref, bufs, sizes)
    err = (got - ref.direction).abs()
    bad = err > tol * scale
    assert not bad.any(), (
        f"{int(bad.sum())} elements of d differ from the oracle beyond {tol} x scale; first at "
        f"{torch.nonzero(bad)[:3].flatten().tolist()}: got {got[bad][:3].tolist()} "
        f"want {ref.direction[bad][:3].tolist()}"
    )


def cos_tolerance(ref: ReferenceResult, sizes) -> torch.Tensor:
    """Per-segment bound on |cos - cos_oracle| for cos computed from float32 statistics.

    The projected norms are differences, ``|gbar|^2 = g.g - s*g.h``: when g is
    nearly parallel to h (``kappa = g.g / |gbar|^2`` large; it happens in short
    segments), the float32 rounding of the statistics, ``u`` relative, becomes
    ``u * kappa`` relative in ``|gbar|^2`` and so in ``cos``. Every statistic
    enters ``gbar_theta . gbar_phi`` through terms bounded by
    ``sqrt(gt.gt * gp.gp)`` (Cauchy-Schwarz), hence the ``sqrt(kt * kp)`` term.
    ``u`` grows with the length summed (log2 n: blocked float32 sums).
    """
    st = ref.stats
    nbt = (st[:, 0] - _ratio(st[:, 1], st[:, 2]) * st[:, 1]).clamp(min=0)
    nbp = (st[:, 3] - _ratio(st[:, 4], st[:, 5]) * st[:, 4]).clamp(min=0)
    kt = _ratio(st[:, 0], nbt).clamp(min=1)
    kp = _ratio(st[:, 3], nbp).clamp(min=1)
    n = torch.tensor([max(int(s), 2) for s in sizes], dtype=torch.float64)
    u = 4 * U32 * torch.log2(n)
    return COS_ATOL + u * (kt + kp + 4 * (kt * kp).sqrt())


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1.0, den))


def assert_cos_close(cos: torch.Tensor, ref: ReferenceResult, sizes) -> None:
    got = cos.to(torch.float64).cpu()
    tol = cos_tolerance(ref, sizes)
    bad = (got - ref.cos).abs() > tol
    assert not bad.any(), (
        f"cos differs from the oracle at segments {torch.nonzero(bad).flatten()[:5].tolist()}: "
        f"got {got[bad][:5].tolist()} want {ref.cos[bad][:5].tolist()} "
        f"(tolerance {tol[bad][:5].tolist()})"
    )


def assert_mask_matches(res, ref: ReferenceResult, sizes, alpha: float, alpha_by: str) -> None:
    """The top-alpha mask, exactly.

    It must be the spec's rule applied to the backend's own ``cos`` (compared
    bit for bit), and equal to the oracle's mask on every segment whose oracle
    ``cos`` is farther from the oracle's threshold than its cos tolerance (an
    ill-conditioned segment next to the threshold may rank either way).
    """
    weights = list(sizes) if alpha_by == "elements" else [1] * len(sizes)
    mask = res.mask.cpu()
    own = reference_top_alpha(res.cos.to(torch.float64).cpu(), weights, alpha)
    assert torch.equal(mask, own), "the mask does not follow the top-alpha rule on its own cos"
    threshold = ref.cos[ref.mask].min()
    clear = (ref.cos - threshold).abs() > cos_tolerance(ref, sizes)
    assert torch.equal(mask[clear], ref.mask[clear]), "top-alpha masks differ from the oracle"


def oracle(bufs, sizes, **kw) -> ReferenceResult:
    return reference_direction(*bufs, sizes, **kw)


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, printed on failure so a run can be replayed."""
    s = int.from_bytes(os.urandom(4))
    print(f"seed={s}")
    return s
