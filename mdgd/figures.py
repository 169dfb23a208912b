"""The figures of one MDGD step: their names (:data:`FIGURES`) and how they come from the op.

:class:`mdgd.MDGDEngine` computes them on the device from the fused op's result
and the loss sums, and brings them back in the step's one host transfer
(:func:`mdgd.batches.step_figures` finishes the last three).
"""

from __future__ import annotations

import math

import torch

import mdgd_kernels

FIGURES = (
    "loss",
    "loss_ref",
    "loss_v",
    "cos_mean",
    "cos_std",
    "selected_fraction",
    "conflict_cos_mean",
    "conflict_fraction",
    "skipped",
    "text_only_fraction",
    "supervised_fraction",
    "updated_fraction",
)
"""Keys of the dict :meth:`MDGDEngine.step` returns (all floats):

* ``loss``, ``loss_ref``: ``L_vl`` of theta and of phi (mean over micro-batches);
* ``loss_v``: ``L_v`` (Eq. 6, with ``visual_weight``);
* ``cos_mean``, ``cos_std``: mean and standard deviation over segments of
  ``cos(gbar_theta, gbar_phi)`` (Eq. 11);
* ``selected_fraction``: fraction of trainable elements updated (< 1 only in ``gm``);
* ``conflict_cos_mean``: mean over parameters of ``cos(g_theta, h_theta)``, the
  modality gradient conflict (MoDE, Definition 1); parameters off the visual path
  (``h_theta == 0``) are left out; NaN when there is none (e.g. ``theta == phi``);
* ``conflict_fraction``: fraction of those parameters with a negative cosine;
* ``skipped``: 1.0 when the step was skipped: non-finite gradients or losses, or
  no supervised token in any micro-batch (:mod:`mdgd.batches`);
* ``text_only_fraction``: fraction of the micro-batches with no image token
  (``L_v = 0``, no ``h`` backward); NaN in ``ft``;
* ``supervised_fraction``: fraction of the micro-batches with a supervised token;
* ``updated_fraction``: fraction of trainable elements the optimizer may change:
  ``selected_fraction``, unless MDGD-GM with ``"block:K"`` runs without
  ``freeze_unselected`` (then whole tensors with a selected block; :mod:`mdgd.budget`).
"""


def figures_ft(loss_sums: torch.Tensor, n: int) -> torch.Tensor:
    """The first nine figures (float64) of an ``ft`` step: the loss, NaN where MDGD is absent."""
    loss = loss_sums[0] / n
    nan = torch.full((), math.nan, device=loss_sums.device)
    one = torch.ones((), device=loss_sums.device)
    skipped = (~torch.isfinite(loss)).float()
    return torch.stack([loss, nan, nan, nan, nan, one, nan, nan, skipped]).double()


def _per_param(values: torch.Tensor, owner: torch.Tensor, num_params: int) -> torch.Tensor:
    """Per-segment rows added up per parameter (``owner[s]``: the parameter of segment ``s``)."""
    out = values.new_zeros((num_params, *values.shape[1:]))
    return out.index_add_(0, owner, values)


def conflict_per_param(
    res: mdgd_kernels.MDGDResult, owner: torch.Tensor | None, num_params: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos(g_theta, h_theta)`` per parameter (float64), and where it is defined.

    It is NaN off the visual path (``h_theta == 0``). The Gram entries add over a
    parameter's segments; ``owner=None`` ("global": one segment owned by every
    parameter) keeps the one segment's value.
    """
    st = torch.stack(mdgd_kernels.stat_columns(res.stats, "gt.gt", "gt.ht", "ht.ht"), 1).double()
    per_param = st if owner is None else _per_param(st, owner, num_params)
    gg, gh, hh = per_param.unbind(1)
    defined = (gg > 0) & (hh > 0)
    return torch.where(defined, gh / (gg * hh).clamp_min(1e-300).sqrt(), math.nan), defined


def figures_mdgd(
    res: mdgd_kernels.MDGDResult,
    conflict: torch.Tensor,
    defined: torch.Tensor,
    loss_sums: torch.Tensor,
    n: int,
    sizes: torch.Tensor,
) -> torch.Tensor:
    """The first nine figures (float64) of an MDGD step from the op's result.

    ``conflict`` and ``defined`` come from :func:`conflict_per_param`; ``sizes`` are the segments'.
    """
    conflict_fraction = ((conflict < 0) & defined).sum() / defined.sum()  # NaN when none
    cos = res.cos.double()
    sizes = sizes.double()
    selected_fraction = (res.mask.double() * sizes).sum() / sizes.sum()
    rest = [
        cos.mean(),
        cos.std(correction=0),
        selected_fraction,
        torch.nanmean(conflict),
        conflict_fraction,
        res.skipped.double(),
    ]
    return torch.cat([loss_sums.double() / n, torch.stack(rest)])


def selected_per_param(
    res: mdgd_kernels.MDGDResult, owner: torch.Tensor | None, num_params: int
) -> torch.Tensor:
    """MDGD-GM: selected segments per parameter; a parameter with none loses its gradient."""
    if owner is None:
        return res.mask.expand(num_params)
    return _per_param(res.mask.float(), owner, num_params)
