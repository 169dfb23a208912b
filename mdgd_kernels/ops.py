"""The public ops, their argument checks and their result.

:func:`segment_gram` (pass 1), :func:`segment_combine_` (pass 2) and
:func:`mdgd_direction_` (both passes and the coefficients between them) check
their arguments here, then call the kernels of the backend that
:mod:`mdgd_kernels.backends` resolves. The math is ``docs/math.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import _ops  # noqa: F401  (registers the torch.library ops)
from .backends import kernels, resolve_backend
from .coeffs import ALPHA_BY, DEFAULT_EPS, MASKED, MODES, Coefficients, coefficients
from .layout import SegmentLayout, get_layout

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
NONFINITE = ("raise", "skip")


class MDGDResult(NamedTuple):
    """What :func:`mdgd_direction_` measured, one entry per segment, on the device."""

    cos: torch.Tensor  # float32 [S]: cosine of gbar_theta and gbar_phi (Eq. 11)
    k: torch.Tensor  # float32 [S]: projection coefficient (Eq. 9)
    mask: torch.Tensor  # bool [S]: selected segments (gm), all True otherwise
    skipped: torch.Tensor  # bool []: non-finite input, buffers left untouched
    stats: torch.Tensor  # float32 [S, 10]: the Gram statistics of pass 1
    s_theta: torch.Tensor  # float32 [S]: gt.ht / ht.ht (Eq. 8)
    s_phi: torch.Tensor  # float32 [S]: gp.hp / hp.hp (Eq. 7)

    @classmethod
    def of(cls, coef: Coefficients, stats: torch.Tensor) -> MDGDResult:
        """The result of a step whose statistics gave the coefficients ``coef``."""
        return cls(
            cos=coef.cos,
            k=coef.k,
            mask=coef.mask,
            skipped=coef.skipped,
            stats=stats,
            s_theta=coef.s_theta,
            s_phi=coef.s_phi,
        )


_ARG_NAMES = ("g_theta", "h_theta", "g_phi", "h_phi")


def _check(buffers: Sequence[torch.Tensor], sizes) -> SegmentLayout:
    for name, buf in zip(_ARG_NAMES, buffers):
        if not isinstance(buf, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(buf).__name__}")
        if buf.dim() != 1:
            raise ValueError(f"{name} must be a flat 1-D buffer, got shape {tuple(buf.shape)}")
        if not buf.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() on it first")
        if buf.dtype not in DTYPES:
            raise ValueError(f"{name} has dtype {buf.dtype}; supported: bfloat16, float16, float32")
    ref = buffers[0]
    for name, buf in zip(_ARG_NAMES[1:], buffers[1:]):
        if buf.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {buf.dtype} but g_theta has {ref.dtype}")
        if buf.device != ref.device:
            raise ValueError(f"{name} is on {buf.device} but g_theta is on {ref.device}")
        if buf.numel() != ref.numel():
            raise ValueError(f"{name} has {buf.numel():,} elements but g_theta has {ref.numel():,}")
    layout = get_layout(sizes, ref.device)
    if layout.device != ref.device:
        raise ValueError(
            f"sizes is a layout on {layout.device} but the buffers are on {ref.device}"
        )
    if layout.numel != ref.numel():
        raise ValueError(f"g_theta has {ref.numel():,} elements but sizes sum to {layout.numel:,}")
    return layout


def segment_gram(
    g_theta: torch.Tensor,
    h_theta: torch.Tensor,
    g_phi: torch.Tensor,
    h_phi: torch.Tensor,
    sizes: Sequence[int] | SegmentLayout,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Pass 1: the ``[S, 10]`` float32 Gram statistics of every segment.

    Columns, in order: ``gt.gt gt.ht ht.ht gp.gp gp.hp hp.hp gt.gp gt.hp ht.gp ht.hp``
    (see ``STAT_NAMES``). Products accumulate in float32 per chunk and chunks are
    combined in a fixed order, so repeated calls give identical bits.
    """
    buffers = (g_theta, h_theta, g_phi, h_phi)
    layout = _check(buffers, sizes)
    gram, _ = kernels(resolve_backend(backend, g_theta.device))
    return gram(*buffers, layout.chunks, layout.chunk_ptr)


def segment_combine_(
    g_theta: torch.Tensor,
    h_theta: torch.Tensor,
    g_phi: torch.Tensor,
    h_phi: torch.Tensor,
    sizes: Sequence[int] | SegmentLayout,
    coeffs: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Pass 2 alone: ``g_theta = c1*gt + c2*ht + c3*gp + c4*hp`` per segment, in place.

    ``coeffs`` is the ``[S, 4]`` float32 table of :func:`coefficients` (one row per
    segment of ``sizes``, on the buffers' device). A zero coefficient means that
    buffer is not read; a row ``(1, 0, 0, 0)`` leaves the segment untouched. Used
    where the statistics come from elsewhere, e.g. summed over the ranks of a
    sharded run (:mod:`mdgd.distributed`).
    """
    buffers = (g_theta, h_theta, g_phi, h_phi)
    layout = _check(buffers, sizes)
    if not isinstance(coeffs, torch.Tensor) or coeffs.dtype != torch.float32:
        raise ValueError(f"coeffs must be a float32 tensor, got {getattr(coeffs, 'dtype', coeffs)}")
    if tuple(coeffs.shape) != (layout.num_segments, 4):
        raise ValueError(
            f"coeffs has shape {tuple(coeffs.shape)} but there are {layout.num_segments} "
            "segments: expected [S, 4]"
        )
    if coeffs.device != g_theta.device:
        raise ValueError(f"coeffs is on {coeffs.device} but g_theta is on {g_theta.device}")
    _, combine = kernels(resolve_backend(backend, g_theta.device))
    combine(*buffers, layout.chunks, coeffs.contiguous())


def mdgd_direction_(
    g_theta: torch.Tensor,
    h_theta: torch.Tensor,
    g_phi: torch.Tensor,
    h_phi: torch.Tensor,
    sizes: Sequence[int] | SegmentLayout,
    *,
    mode: str = "mdgd",
    alpha: float = 0.1,
    align: bool = True,
    alpha_by: str = "elements",
    nonfinite: str = "raise",
    eps: float = DEFAULT_EPS,
    backend: str | None = None,
    names: Sequence[str] | None = None,
    masked: str = "zero",
    scale: float = 1.0,
) -> MDGDResult:
    """Write the MDGD update direction into ``g_theta`` in place (two passes).

    Args:
        g_theta, h_theta, g_phi, h_phi: flat, contiguous gradient buffers of one
            dtype (bf16/fp16/fp32), device and length.
        sizes: segment sizes summing to the buffer length (one per parameter
            tensor by default in the driver), or a cached :class:`SegmentLayout`.
        mode: ``"mdgd"`` (Eq. 10), ``"gm"`` (MDGD-GM, Eq. 12) or ``"ft"`` (plain
            fine-tuning: ``g_theta`` is left as it is).
        alpha: fraction in (0, 1] kept by ``gm``, counted by ``alpha_by``
            (``"elements"`` or ``"segments"``).
        align: include the visual-alignment gradient ``h_theta`` (False is the
            paper's "w/o visual align").
        nonfinite: ``"raise"`` raises ``FloatingPointError`` naming the first
            segment with NaN/Inf, before anything is written (one host sync);
            ``"skip"`` leaves every buffer untouched and sets ``result.skipped``
            on the device (no host sync). Under ``torch.compile(fullgraph=True)``
            use ``"skip"`` and a :class:`SegmentLayout`: the host sync of
            ``"raise"`` and building a layout from ``sizes`` break the graph.
        eps: relative threshold under which a projected norm is degenerate.
        backend: ``"triton"``, ``"cuda"``, ``"cpu"``, ``"torch"`` or None (auto).
        names: optional segment names, used in error messages.
        masked: what ``gm`` writes into the segments its mask drops: ``"zero"``
            (Eq. 12, ``d = 0``) or ``"keep"`` (nothing: they are neither read
            nor written and keep ``g_theta``, so pass 2 touches only the selected
            segments). ``"keep"`` is for callers that discard those segments'
            gradients anyway, as the driver does with ``grad = None``.
        scale: multiplies the direction, at no extra traffic (pass 2 applies it;
            e.g. ``1 / micro_batches`` to turn summed gradients into the mean).
            With ``mode="ft"`` and ``scale != 1``, pass 2 runs to apply it.
    """
    if masked not in MASKED:
        raise ValueError(f"masked must be one of {MASKED}, got {masked!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if alpha_by not in ALPHA_BY:
        raise ValueError(f"alpha_by must be one of {ALPHA_BY}, got {alpha_by!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    buffers = (g_theta, h_theta, g_phi, h_phi)
    layout = _check(buffers, sizes)
    if names is not None and len(names) != layout.num_segments:
        raise ValueError(
            f"names has {len(names)} entries but there are {layout.num_segments} segments"
        )
    gram, combine = kernels(resolve_backend(backend, g_theta.device))

    stats = gram(*buffers, layout.chunks, layout.chunk_ptr)
    coef = coefficients(
        stats,
        layout.sizes_t,
        mode=mode,
        alpha=alpha,
        align=align,
        alpha_by=alpha_by,
        eps=eps,
        masked=masked,
        scale=scale,
    )
    if nonfinite == "raise" and bool(coef.skipped):  # the one host sync of "raise"
        _raise_nonfinite(coef.nonfinite, layout, names)
    if mode != "ft" or scale != 1.0:
        combine(*buffers, layout.chunks, coef.coeffs)
    return MDGDResult.of(coef, stats)


def _raise_nonfinite(flags: torch.Tensor, layout: SegmentLayout, names) -> None:
    bad = torch.nonzero(flags).flatten().tolist()
    s = bad[0]
    lo, hi = layout.segment_range(s)
    what = f"segment {s}" + (f" ({names[s]})" if names is not None else "")
    more = f" and {len(bad) - 1} more segment(s)" if len(bad) > 1 else ""
    raise FloatingPointError(
        f"non-finite gradient (NaN or Inf) in {what}, elements {lo:,}..{hi:,}{more}; "
        "nothing was written. Pass nonfinite='skip' to skip such steps instead."
    )
