"""Per-segment coefficients and the top-alpha mask, from the ``[S, 10]`` statistics.

This is the small step between the two passes (docs/math.md §4-6). It runs as
a handful of torch ops on ``[S]``-sized tensors on the buffers' device, in
float64 (``S`` is at most a few thousand, so precision is free), with no host
synchronisation. Every backend shares it, so the backends differ only in the
two memory-bound passes.

Statistics columns (docs/math.md §3): ``STAT_NAMES`` below, the one definition of
their order (``tests/test_stats_order.py`` checks the C++, CUDA and Triton kernels
against it).

The combine pass computes ``d = c1*gt + c2*ht + c3*gp + c4*hp`` per segment from
the ``[S, 4]`` float32 table returned here. A coefficient that is exactly 0 means
"that buffer is not read" and a row ``(1, 0, 0, 0)`` means "segment untouched":
that is how an ``ft`` or skipped segment, or one ``gm`` drops under
``masked="keep"``, costs no traffic and keeps its bits (under ``masked="zero"``
a dropped segment, row ``(0, 0, 0, 0)``, is written as zeros without a read).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MODES = ("mdgd", "gm", "ft")
ALPHA_BY = ("elements", "segments")
MASKED = ("zero", "keep")
DEFAULT_EPS = 1e-6
# The columns of pass 1's [S, 10] statistics, in order (gt = g_theta, ht = h_theta,
# gp = g_phi, hp = h_phi).
STAT_NAMES = (
    "gt.gt",
    "gt.ht",
    "ht.ht",
    "gp.gp",
    "gp.hp",
    "hp.hp",
    "gt.gp",
    "gt.hp",
    "ht.gp",
    "ht.hp",
)


class Coefficients(NamedTuple):
    coeffs: torch.Tensor  # float32 [S, 4]
    cos: torch.Tensor  # float32 [S], Eq. 11
    k: torch.Tensor  # float32 [S], Eq. 9
    s_theta: torch.Tensor  # float32 [S], Eq. 8
    s_phi: torch.Tensor  # float32 [S], Eq. 7
    mask: torch.Tensor  # bool [S], Eq. 11 (all True outside gm)
    nonfinite: torch.Tensor  # bool [S]: the segment's statistics are NaN/Inf
    skipped: torch.Tensor  # bool []: the whole step is left untouched


def stat_columns(stats: torch.Tensor, *names: str) -> list[torch.Tensor]:
    """The named columns of an ``[S, 10]`` statistics table, e.g. ``"gt.ht"``."""
    return [stats[:, STAT_NAMES.index(name)] for name in names]


def _safe_div(num: torch.Tensor, den: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.where(
        zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den)
    )


def top_alpha_mask(cos: torch.Tensor, weights: torch.Tensor, alpha: float) -> torch.Tensor:
    """The top-alpha mask of MDGD-GM (Eq. 11), sort + cumsum on the device, no sync.

    Segments are ordered by ``cos`` descending (stable: ties keep the lower index
    first); the mask keeps exactly the shortest prefix of that order whose
    ``weights`` sum to at least ``alpha * sum(weights)``. Unlike the paper's
    literal ``1[cos >= T_alpha]`` it never keeps the segments tied with the last
    one kept (at theta = phi every cos is 1, and the literal rule keeps all).
    """
    order = torch.sort(cos, descending=True, stable=True).indices
    running = torch.cumsum(weights.to(torch.float64)[order], 0)
    target = (alpha * running[-1]).reshape(1)
    last = torch.searchsorted(running, target)  # first prefix reaching the target
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return rank <= last


def coefficients(
    stats: torch.Tensor,
    sizes: torch.Tensor,
    *,
    mode: str = "mdgd",
    alpha: float = 0.1,
    align: bool = True,
    alpha_by: str = "elements",
    eps: float = DEFAULT_EPS,
    skip_nonfinite: bool = True,
    masked: str = "zero",
    scale: float = 1.0,
) -> Coefficients:
    """Coefficients of every segment from its Gram statistics (docs/math.md §4-6).

    ``scale`` multiplies every row, i.e. the direction (the driver's average over
    micro-batches and ranks, folded into pass 2 instead of a separate pass over
    ``g_theta``; the cosines and the mask do not depend on it).
    ``masked="keep"`` gives the segments ``gm`` drops the untouched row
    ``(1, 0, 0, 0)`` instead of zeros: pass 2 then skips them entirely.
    """
    st = stats.to(torch.float64)
    gtgt, gtht, htht, gpgp, gphp, hphp, gtgp, gthp, htgp, hthp = stat_columns(
        st, "gt.gt", "gt.ht", "ht.ht", "gp.gp", "gp.hp", "hp.hp", "gt.gp", "gt.hp", "ht.gp", "ht.hp"
    )
    s_t = _safe_div(gtht, htht, htht == 0)  # Eq. 8
    s_p = _safe_div(gphp, hphp, hphp == 0)  # Eq. 7
    dot = gtgp - s_p * gthp - s_t * htgp + s_t * s_p * hthp  # gbar_theta . gbar_phi
    nbp = torch.clamp(gpgp - s_p * gphp, min=0)  # |gbar_phi|^2
    nbt = torch.clamp(gtgt - s_t * gtht, min=0)  # |gbar_theta|^2
    deg_p = nbp <= eps * gpgp
    deg_t = nbt <= eps * gtgt
    k = _safe_div(dot, nbp, deg_p)  # Eq. 9
    # Eq. 11; statistics rounded to float32 can break Cauchy-Schwarz (nearly parallel or
    # underflowing vectors): a cosine stays in [-1, 1] whatever the rounding
    cos = _safe_div(dot, torch.sqrt(nbt * nbp), deg_p | deg_t).clamp(-1.0, 1.0)

    one = torch.ones_like(k)
    zero = torch.zeros_like(k)
    a = one if align else zero
    if mode == "mdgd":
        mask = torch.ones_like(k, dtype=torch.bool)
        c = torch.stack([one, a, k, -k * s_p], dim=1)
    elif mode == "gm":
        weights = sizes if alpha_by == "elements" else torch.ones_like(sizes)
        # rank the float32 cos the result reports: float64 noise below its resolution
        # must not break the ties (theta = phi gives cos 1 +- 1e-16 everywhere)
        mask = top_alpha_mask(cos.to(torch.float32), weights, alpha)
        m = mask.to(k.dtype)
        c = torch.stack([m, m * a, zero, zero], dim=1) * scale
        if masked == "keep":  # dropped rows become (1, 0, 0, 0): not read, not written
            c[:, 0] = torch.where(mask, c[:, 0], one)
    elif mode == "ft":
        mask = torch.ones_like(k, dtype=torch.bool)
        c = torch.stack([one, zero, zero, zero], dim=1) * scale
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "mdgd":
        c = c * scale

    nonfinite = ~torch.isfinite(stats).all(dim=1)
    skipped = nonfinite.any()
    if skip_nonfinite:
        identity = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=c.dtype, device=c.device)
        c = torch.where(skipped, identity.expand_as(c), c)
    f32 = torch.float32
    return Coefficients(
        coeffs=c.to(f32).contiguous(),
        cos=cos.to(f32),
        k=k.to(f32),
        s_theta=s_t.to(f32),
        s_phi=s_p.to(f32),
        mask=mask,
        nonfinite=nonfinite,
        skipped=skipped,
    )
