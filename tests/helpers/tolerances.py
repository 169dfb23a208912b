"""Tolerances of the run-against-run comparisons, derived from float32 arithmetic.

Not a test file. docs/testing.md ("Tolerances: where the numbers come from") writes the
model out with worked numbers; every constant here is a count of roundings, an
optimizer hyperparameter or a float32 spacing, never a fitted number.

Two runs of one step from the same state (parameters and optimizer moments) differ
only by the order of float32 operations: the ranks' reduction against one process's
accumulation, pass 1's statistics summed in pieces, and the roundings that follow.
So the bound is built per element and per step:

* the direction ``d`` the optimizer sees: :func:`direction_noise`;
* through the optimizer step: :func:`sgd_step_noise`, :func:`adamw_step_noise`;
* the parameter's own rounding: :func:`parameter_bound` adds one float32 ulp.

A multi-step comparison has a fourth source, the gradient's dependence on the
parameters (a step-1 difference changes step 2's gradient through the model), which
no rounding count bounds; the distributed tests therefore compare every step from
the *same* state (the reference loads the multi-process run's parameters and moments
before each of its steps) and check the states chain from the same start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

U32 = 2.0**-24
"""float32 unit roundoff: one correctly rounded operation moves a value by at most
``U32 * |value|`` (half a float32 ulp)."""
SUB32 = 2.0**-149
"""float32's smallest subnormal: the spacing of float32 near zero."""


def ulp32(x: torch.Tensor) -> torch.Tensor:
    """The spacing of float32 numbers at ``|x|`` (``2**-23 * 2**floor(log2 |x|)``, at
    least the subnormal spacing), as float64."""
    _, exp = torch.frexp(x.to(torch.float64).abs())  # |x| = m * 2**exp, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), exp - 24).clamp(min=SUB32)


def half_spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of ``dtype`` at ``|x|``: the most a correct rounding to ``dtype``
    moves a value of that size. Below the smallest normal the spacing stops shrinking
    (gradual underflow): ``smallest_normal * eps``, 2**-24 for fp16, so the rounding
    error there is absolute, not relative."""
    fi = torch.finfo(dtype)
    _, exp = torch.frexp(x.to(torch.float64).abs())  # binade [2**(exp-1), 2**exp)
    spacing = torch.ldexp(torch.full_like(x, fi.eps, dtype=torch.float64), exp - 1)
    return spacing.clamp(min=fi.smallest_normal * fi.eps) / 2


def combine_bound(
    want: torch.Tensor, terms: torch.Tensor, dtype: torch.dtype, *, truncates: bool = False
) -> torch.Tensor:
    """Per-element bound on pass 2's ``d = c1*gt + c2*ht + c3*gp + c4*hp`` against its
    float64 value ``want``, for given float32 coefficients and ``dtype`` inputs (exact
    in float32): four products and three sums in float32 (``gamma_4 = 4u / (1 - 4u)``
    of ``terms = sum_i |c_i x_i|``; fused multiply-adds round less), then one rounding
    to ``dtype``: half its spacing at the result, subnormal spacing included, or a whole
    spacing where the cast ``truncates`` (Triton's interpreter casts float32 to bf16
    toward zero; compiled Triton, CUDA and the CPU round to nearest)."""
    e32 = 4 * U32 / (1 - 4 * U32) * terms.to(torch.float64)
    cast = half_spacing(want.abs() + e32, dtype)
    return e32 + (2 * cast if truncates else cast)


def accumulation_roundings(world: int, micro: int) -> int:
    """Roundings between the two sums of one element's ``world * micro`` micro-batch
    gradients: one process adds them one by one (``world * micro - 1``), the ranks add
    their own (``micro - 1``) and the collective adds across ranks (``world - 1``: a
    ring or tree adds each element once per rank). Dividing by a power-of-two world is
    exact; another world adds its one rounding."""
    exact_div = world & (world - 1) == 0
    return (world * micro - 1) + (micro - 1) + (world - 1) + (0 if exact_div else 1)


COMBINE_ROUNDINGS = 10
"""``d = c1*gt + c2*ht + c3*gp + c4*hp`` in float32 (four products, three sums: at most
4 roundings of ``sum |c_i x_i|`` in each run) and each run's float64 coefficients
rounded to float32 (1 each): ``2 * (4 + 1)``."""


def stats_roundoff(sizes: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Per-segment relative error bound of float32 statistics summed over ``sizes``
    elements (blocked sums: ``4 u log2 n``), relative to ``sqrt(a.a * b.b)``."""
    n = torch.as_tensor(sizes, dtype=torch.float64).clamp(min=2)
    return 4 * U32 * torch.log2(n)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, 1.0, den))


def projections(stats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(s_theta, s_phi, |gbar_theta|^2, |gbar_phi|^2)`` per segment, float64, from the
    ``[S, 10]`` statistics (docs/math.md §4)."""
    st = stats.to(torch.float64)
    s_t, s_p = _ratio(st[:, 1], st[:, 2]), _ratio(st[:, 4], st[:, 5])
    nbt = (st[:, 0] - s_t * st[:, 1]).clamp(min=0)
    nbp = (st[:, 3] - s_p * st[:, 4]).clamp(min=0)
    return s_t, s_p, nbt, nbp


def cos_bound(stats: torch.Tensor, u: torch.Tensor, atol: float) -> torch.Tensor:
    """Per-segment bound on the error of ``cos`` computed from statistics with relative
    error ``u``: ``atol + u (kt + kp + 4 sqrt(kt kp))``, ``k = g.g / |gbar|^2`` the
    conditioning of the projected norms (a difference; see conftest.cos_tolerance)."""
    st = stats.to(torch.float64)
    _, _, nbt, nbp = projections(st)
    kt = _ratio(st[:, 0], nbt).clamp(min=1)
    kp = _ratio(st[:, 3], nbp).clamp(min=1)
    return atol + u * (kt + kp + 4 * (kt * kp).sqrt())


def k_bound(stats: torch.Tensor, k: torch.Tensor, u: torch.Tensor, u_out: float) -> torch.Tensor:
    """Per-segment bound on the error of ``k = gbar_theta . gbar_phi / |gbar_phi|^2``
    from statistics with relative error ``u``: the numerator's four terms are each
    within ``sqrt(gt.gt * gp.gp)`` (Cauchy-Schwarz), the denominator is a difference
    (``3 u kappa_phi`` relative), and ``u_out`` is k's own final rounding."""
    st = stats.to(torch.float64)
    _, _, _, nbp = projections(st)
    k_dot = 8 * u * _ratio((st[:, 0] * st[:, 3]).sqrt(), nbp)
    return k_dot + (3 * u * _ratio(st[:, 3], nbp) + u_out) * k.to(torch.float64).abs()


def s_bound(stats: torch.Tensor, u: torch.Tensor, which: str) -> torch.Tensor:
    """Per-segment bound on the error of ``s = g.h / h.h`` (``which`` is ``"theta"`` or
    ``"phi"``) from statistics with relative error ``u``: ``2 u sqrt(g.g / h.h)``."""
    st = stats.to(torch.float64)
    g, h = (0, 2) if which == "theta" else (3, 5)
    return 2 * u * _ratio(st[:, g], st[:, h]).sqrt()


def degenerate_band(stats: torch.Tensor, u: torch.Tensor, eps: float) -> torch.Tensor:
    """Segments whose degeneracy test (``|gbar|^2 <= eps * g.g``) is within the
    statistics' rounding (``3 u g.g``) of its threshold: either answer is right."""
    st = stats.to(torch.float64)
    _, _, nbt, nbp = projections(st)
    band = (nbt - eps * st[:, 0]).abs() <= 3 * u * st[:, 0]
    return band | ((nbp - eps * st[:, 3]).abs() <= 3 * u * st[:, 3])


def direction_noise(
    terms: torch.Tensor,
    sums: torch.Tensor,
    sizes: torch.Tensor,
    coeffs: torch.Tensor,
    roundings: int,
    coeff_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-element bound on ``|d_a - d_b|`` for one step of two runs from the same state.

    ``terms``: ``[4, N]``, per buffer (gt, ht, gp, hp) and element, the sum of the
    micro-batches' absolute gradients ``sum_m |x_m|`` (what the accumulation rounds);
    ``sums``: ``[4, N]``, the accumulated buffers ``x``; ``coeffs``: ``[S, 4]`` the
    step's coefficients (the micro-batch average folded in); ``roundings``:
    :func:`accumulation_roundings`; ``coeff_noise``: ``[S, 4]`` bounds on the
    coefficients' differences (:func:`coefficient_noise`), ``None`` when the
    coefficients are exact (``gm`` and ``ft`` rows are 0, 1 and the average).

        |dd| <= u (roundings * sum_i |c_i| terms_i + COMBINE_ROUNDINGS * sum_i |c_i x_i|)
                + sum_i |dc_i| (|x_i| + roundings * u * terms_i)
    """
    reps = sizes.to(torch.int64)
    c = torch.repeat_interleave(coeffs.to(torch.float64).abs(), reps, dim=0).t()  # [4, N]
    t, x = terms.to(torch.float64), sums.to(torch.float64).abs()
    out = U32 * (roundings * (c * t).sum(0) + COMBINE_ROUNDINGS * (c * x).sum(0))
    if coeff_noise is not None:
        dc = torch.repeat_interleave(coeff_noise.to(torch.float64), reps, dim=0).t()
        out += (dc * (x + roundings * U32 * t)).sum(0)
    return out


def buffer_noise(terms: torch.Tensor, sums: torch.Tensor, sizes, roundings: int) -> torch.Tensor:
    """Per segment, the largest relative difference ``|dx| / |x|`` (2-norms over the
    segment) of the four accumulated buffers between the two runs."""
    reps = torch.as_tensor(sizes, dtype=torch.int64)
    seg = torch.repeat_interleave(torch.arange(reps.numel()), reps)
    num = torch.zeros(4, reps.numel(), dtype=torch.float64)
    den = torch.zeros_like(num)
    num.index_add_(1, seg, (roundings * U32 * terms.to(torch.float64)) ** 2)
    den.index_add_(1, seg, sums.to(torch.float64) ** 2)
    rel = torch.where(den > 0, (num / torch.where(den > 0, den, 1.0)).sqrt(), 0.0)
    return rel.max(0).values


def coefficient_noise(
    stats: torch.Tensor,
    sizes: torch.Tensor,
    k: torch.Tensor,
    s_phi: torch.Tensor,
    *,
    scale: float,
    eps: float,
    pieces: int,
    buffer_rel: torch.Tensor,
) -> torch.Tensor:
    """``[S, 4]`` bounds on the differences of MDGD's rows ``(1, a, k, -k s_phi) * scale``
    between two runs whose statistics are summed in different orders (the first two
    entries are exact in both).

    Each run's statistics are within ``stats_roundoff(n)`` of the exact sums of its
    buffers (the multi-process one adds ``pieces - 1`` roundings: its per-rank pieces
    and their all-reduce), and the buffers themselves differ by ``buffer_rel``
    (relative, :func:`buffer_noise`), which moves a dot product by twice that relative
    to ``sqrt(a.a * b.b)``. The two runs' errors add. The coefficients are float64 sums
    of float32 statistics, so ``k``'s final rounding does not enter (``u_out = 0``); a
    segment within rounding of the degeneracy threshold may get ``k = 0`` in one run.
    """
    u = 2 * stats_roundoff(sizes) + (pieces - 1) * U32 + 2 * buffer_rel.to(torch.float64)
    dk = k_bound(stats, k, u, 0.0)
    band = degenerate_band(stats, u, eps)
    k64 = k.to(torch.float64).abs()
    dk = torch.where(band, k64 + dk, dk)
    dsp = s_bound(stats, u, "phi")
    sp = s_phi.to(torch.float64).abs()
    dks = dk * sp + (k64 + dk) * dsp
    zero = torch.zeros_like(dk)
    return torch.stack([zero, zero, dk, dks], dim=1) * abs(scale)


def sgd_step_noise(lr: float, dg: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``p - lr g`` (plain SGD): ``lr |dg|``, plus ``lr g``'s rounding in each run."""
    g = g.to(torch.float64).abs()
    return lr * (dg + 2 * U32 * (g + dg))


ADAMW_ROUNDINGS = 20
"""Roundings of AdamW's step ``lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)`` relative to the
step, per run, rounded up: ``m``'s lerp (3), ``v``'s mul and addcmul (3, halved by the
sqrt), the sqrt, the division by ``sqrt(bc2)``, ``+ eps``, ``m / denom`` and the
multiplication by ``-lr/bc1`` (1 each): under 10 per run, 20 for two."""


def adamw_step_noise(
    group: dict,
    step: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    dg: torch.Tensor,
) -> torch.Tensor:
    """Bound on ``|step_a - step_b|`` of torch's AdamW at step ``step`` (per element, from
    1) when the two runs start from the same moments and their gradients differ by ``dg``.

    ``exp_avg`` and ``exp_avg_sq`` are one run's moments *after* the step. With
    ``m = b1 m + (1 - b1) g`` and ``s = sqrt(v / bc2) + eps``, ``v = b2 v + (1 - b2) g^2``:
    ``|dm| = (1 - b1) |dg|`` and, sqrt(v) being a 2-norm of ``(sqrt(b2 v), sqrt(1 - b2) g)``,
    ``|ds| <= sqrt((1 - b2) / bc2) |dg|``. The quotient ``m / s`` then moves by at most
    ``|dm| / s' + (|m| + |dm|) |ds| / (s s')`` with ``s' = max(s - |ds|, eps)``, times
    ``lr / bc1``. Where ``g`` is noise-sized, ``s ~ eps`` and this is about
    ``lr |dg| / eps`` per unit of ``|dg|`` (AdamW's amplification of small gradients,
    ``lr / eps`` against SGD's ``lr``); plus ADAMW_ROUNDINGS of the step itself.
    """
    if group.get("amsgrad") or group.get("maximize"):
        raise ValueError("adamw_step_noise models AdamW without amsgrad or maximize")
    lr, eps = float(group["lr"]), float(group["eps"])
    b1, b2 = (float(b) for b in group["betas"])
    step = torch.as_tensor(step, dtype=torch.float64)
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    m, v = exp_avg.to(torch.float64), exp_avg_sq.to(torch.float64)
    s = (v / bc2).sqrt() + eps
    dm = (1 - b1) * dg
    ds = ((1 - b2) / bc2).sqrt() * dg
    s_low = (s - ds).clamp(min=eps)
    moved = dm / s_low + (m.abs() + dm) * ds / (s * s_low)
    size = m.abs() / s  # the step over lr / bc1
    return lr / bc1 * (moved + ADAMW_ROUNDINGS * U32 * (size + moved))


def parameter_bound(want: torch.Tensor, step_noise: torch.Tensor) -> torch.Tensor:
    """Bound on ``|p_a - p_b|`` after ``p <- p - step`` from the same ``p``: the steps'
    difference, plus each run's rounding of the new parameter (half a float32 ulp each,
    at the larger of the two values)."""
    w = want.to(torch.float64).abs()
    return step_noise + ulp32(w + step_noise + ulp32(w))


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """``|got - want| <= bound`` element by element; the message names how many elements
    fail, the worst (largest ``|diff| / bound``) with its index, values and bound, and
    the largest absolute difference."""
    got, want = got.to(torch.float64), want.to(torch.float64)
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(want)
    diff = (got - want).abs()
    bad = ~(diff <= bound)  # NaN fails too
    if not bad.any():
        return
    excess = torch.where(bad, diff / bound.clamp(min=SUB32), 0.0).nan_to_num(math.inf)
    i = int(excess.argmax())
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ beyond the bound; worst "
        f"at index {i}: got {got[i].item():.9g}, want {want[i].item():.9g}, |diff| "
        f"{diff[i].item():.3g} > bound {bound[i].item():.3g} ({excess[i].item():.3g}x); "
        f"largest |diff| {diff.max().item():.3g} at index {int(diff.argmax())}"
    )


def prefixed(what: str) -> Callable[[str], str]:
    """A ``msg`` for ``torch.testing.assert_close`` that names ``what`` and keeps torch's
    own message (the mismatch count, the greatest absolute and relative differences and
    their index), which a plain string ``msg`` would replace."""
    return lambda message: f"{what}: {message}"
