"""The float64 oracle of MDGD, written as the paper's equations (docs/math.md §3-6).

Every backend is tested against these functions. They favour readability over
speed: a Python loop over segments, explicit projected vectors, float64 for every
intermediate. Do not optimise this file; optimise the kernels.

Also here: :func:`per_tensor_direction_`, the float32 per-parameter loop a user
would write by hand (``torch.dot`` and ``add_`` per tensor). It is the baseline
the benchmarks measure the fused ops against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .coeffs import STAT_NAMES

EPS = 1e-6


class ReferenceResult(NamedTuple):
    direction: torch.Tensor  # float64 [N]
    cos: torch.Tensor  # float64 [S]
    k: torch.Tensor  # float64 [S]
    mask: torch.Tensor  # bool [S]
    skipped: bool
    stats: torch.Tensor  # float64 [S, 10]
    coeffs: torch.Tensor  # float64 [S, 4]: d = c1*gt + c2*ht + c3*gp + c4*hp


def _segments(x: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(x.to(torch.float64), list(sizes)))


def reference_gram(gt, ht, gp, hp, sizes: Sequence[int]) -> torch.Tensor:
    """``[S, 10]`` float64, one column per product of ``STAT_NAMES``, in its order."""
    pairs = [name.split(".") for name in STAT_NAMES]
    rows = []
    for a, b, c, d in zip(*(_segments(x, sizes) for x in (gt, ht, gp, hp))):
        seg = {"gt": a, "ht": b, "gp": c, "hp": d}
        rows.append(torch.stack([torch.dot(seg[x], seg[y]) for x, y in pairs]))
    return torch.stack(rows)


def _project_out(g: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7/8: ``g - (g.h / |h|^2) h``; the coefficient is 0 when h is exactly zero."""
    hh = torch.dot(h, h)
    s = torch.dot(g, h) / hh if hh != 0 else torch.zeros((), dtype=torch.float64)
    return g - s * h, s


def reference_top_alpha(cos: torch.Tensor, weights: Sequence[int], alpha: float) -> torch.Tensor:
    """Eq. 11's mask by the strict prefix rule, walked one segment at a time.

    Visit the segments by ``cos`` descending, ties by lower index first, and keep
    each one until the kept weight reaches ``alpha * sum(weights)``; keep no more.
    """
    order = sorted(range(len(weights)), key=lambda i: (-float(cos[i]), i))
    total = float(sum(weights))
    mask = torch.zeros(len(weights), dtype=torch.bool)
    running = 0.0
    for i in order:
        mask[i] = True
        running += weights[i]
        if running >= alpha * total:
            break
    return mask


def reference_direction(
    gt: torch.Tensor,
    ht: torch.Tensor,
    gp: torch.Tensor,
    hp: torch.Tensor,
    sizes: Sequence[int],
    *,
    mode: str = "mdgd",
    alpha: float = 0.1,
    align: bool = True,
    alpha_by: str = "elements",
    eps: float = EPS,
) -> ReferenceResult:
    """The MDGD direction ``d`` in float64 (does not modify its inputs).

    With NaN/Inf in any segment the result is ``skipped`` and ``d = g_theta``.
    A term whose coefficient is exactly zero is left out of ``d`` (so that a NaN
    in a buffer that is not used does not leak in), as in every backend.
    """
    sizes = [int(s) for s in sizes]
    stats = reference_gram(gt, ht, gp, hp, sizes)
    cos, ks, coeffs = [], [], []
    for a, b, c, d in zip(*(_segments(x, sizes) for x in (gt, ht, gp, hp))):
        gbar_t, s_t = _project_out(a, b)  # Eq. 8
        gbar_p, s_p = _project_out(c, d)  # Eq. 7
        dot = torch.dot(gbar_t, gbar_p)
        nbp, nbt = torch.dot(gbar_p, gbar_p), torch.dot(gbar_t, gbar_t)
        deg_p = nbp <= eps * torch.dot(c, c)
        deg_t = nbt <= eps * torch.dot(a, a)
        k = torch.zeros((), dtype=torch.float64) if deg_p else dot / nbp  # Eq. 9
        cs = torch.zeros((), dtype=torch.float64) if deg_p or deg_t else dot / (nbt * nbp).sqrt()
        ks.append(k)
        cos.append(cs)
        # Eq. 10: d = grad L_vl + grad L_v + k * gbar_phi, gbar_phi = gp - s_p * hp
        coeffs.append((1.0, 1.0 if align else 0.0, k, -k * s_p))
    cos_t, k_t = torch.stack(cos), torch.stack(ks)

    if mode == "gm":  # Eq. 11/12: d = M * (grad L_vl + grad L_v)
        weights = sizes if alpha_by == "elements" else [1] * len(sizes)
        mask = reference_top_alpha(cos_t, weights, alpha)
        coeffs = [(float(m), float(m) * (1.0 if align else 0.0), 0.0, 0.0) for m in mask]
    elif mode == "ft":
        mask = torch.ones(len(sizes), dtype=torch.bool)
        coeffs = [(1.0, 0.0, 0.0, 0.0)] * len(sizes)
    elif mode == "mdgd":
        mask = torch.ones(len(sizes), dtype=torch.bool)
    else:
        raise ValueError(f"unknown mode {mode!r}")

    coeffs_t = torch.tensor([[float(c) for c in cf] for cf in coeffs], dtype=torch.float64)
    skipped = not bool(torch.isfinite(stats).all())
    if skipped:
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64).expand_as(coeffs_t)
        d = gt.to(torch.float64).clone()
        return ReferenceResult(d, cos_t, k_t, mask, True, stats, identity.clone())
    parts = []
    for cf, *xs in zip(coeffs, *(_segments(x, sizes) for x in (gt, ht, gp, hp))):
        d = torch.zeros_like(xs[0])
        for c, x in zip(cf, xs):
            if float(c) != 0.0:
                d = d + c * x
        parts.append(d)
    return ReferenceResult(torch.cat(parts), cos_t, k_t, mask, False, stats, coeffs_t)


def per_tensor_direction_(
    g_theta: Sequence[torch.Tensor],
    h_theta: Sequence[torch.Tensor],
    g_phi: Sequence[torch.Tensor],
    h_phi: Sequence[torch.Tensor],
    *,
    align: bool = True,
    eps: float = EPS,
) -> None:
    """What a user writes by hand: MDGD (Eq. 10) one parameter at a time, in float32.

    Overwrites each ``g_theta[i]`` in place. This is the per-tensor baseline of
    the benchmarks, not an oracle (it has a host sync per tensor).
    """
    for gt, ht, gp, hp in zip(g_theta, h_theta, g_phi, h_phi):
        a, b, c, d = (x.reshape(-1).float() for x in (gt, ht, gp, hp))
        hh, pp = torch.dot(b, b), torch.dot(d, d)
        s_t = torch.dot(a, b) / hh if hh != 0 else 0.0
        s_p = torch.dot(c, d) / pp if pp != 0 else 0.0
        gbar_t = a - s_t * b
        gbar_p = c - s_p * d
        nbp = torch.dot(gbar_p, gbar_p)
        k = torch.dot(gbar_t, gbar_p) / nbp if nbp > eps * torch.dot(c, c) else 0.0
        out = a.clone()
        if align:
            out.add_(b)
        out.add_(gbar_p, alpha=float(k))
        gt.copy_(out.view_as(gt))
