"""The engines behind the step benchmark's rows (imported by its worker processes only).

``ft``, ``mdgd`` and the distributed rows run :class:`mdgd.MDGDEngine` itself; two rows
run a variant of it:

* ``mdgd-per-tensor``: the fused op replaced by the per-tensor loop a user writes by hand
  (:func:`mdgd_kernels.reference.per_tensor_direction_`);
* ``mdgd-recompute``: ``backward(L_vl)`` frees its graph and ``L_v`` is recomputed by two
  more forwards, instead of retaining the graph (the "retain or recompute?" question).
"""

from __future__ import annotations

import math

import torch

from mdgd import MDGDEngine
from mdgd.distributed import LocalExchange
from mdgd.visual import visual_l1
from mdgd_kernels.reference import per_tensor_direction_


class PerTensorExchange(LocalExchange):
    """The fused op replaced by the per-tensor loop."""

    def direction(self, loss_sums, n):
        totals = self.reduce(loss_sums, n)
        per_tensor_direction_(
            self.theta.views["g"],
            self.theta.views["h"],
            self.phi.views["g"],
            self.phi.views["h"],
            align=self.config.align,
        )
        if n > 1:
            self.theta.buffers["g"].mul_(1.0 / n)
        return None, totals


class PerTensorEngine(MDGDEngine):
    """MDGD with the per-tensor op; no statistics reported."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.exchange.__class__ = PerTensorExchange

    def _figures_mdgd(self, res, n):
        nan = torch.full((6,), math.nan, device=self.device, dtype=torch.float64)
        nan[2], nan[5] = 1.0, 0.0  # selected_fraction, skipped
        figs = torch.cat([self._loss_sums.double() / n, nan])
        return figs, torch.empty(0, device=self.device)


class RecomputeEngine(MDGDEngine):
    """backward(L_vl) frees its graph; L_v is recomputed by two more forwards."""

    def _backward_mdgd(self, batch, last):
        out_t, out_p = self.model(**batch), self.ref_model(**batch)
        self.theta.point("g")
        self.phi.point("g")
        self.exchange.before_backward("g", last)
        (out_t.loss + out_p.loss).backward()
        self.exchange.after_backward("g", last)
        kw = {**self.visual.forward_kwargs, "logits_to_keep": 1}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        z_t, mask = self.visual(self.model, batch, self.model(**inputs, **kw))
        z_p, _ = self.visual(self.ref_model, batch, self.ref_model(**inputs, **kw))
        loss_v = self.config.visual_weight * visual_l1(z_p, z_t, mask)
        self.theta.point("h")
        self.phi.point("h")
        self.exchange.before_backward("h", last)
        loss_v.backward()
        self.exchange.after_backward("h", last)
        losses = torch.stack([out_t.loss.detach(), out_p.loss.detach(), loss_v.detach()])
        self._loss_sums += losses.float()
        return losses[0]


VARIANTS = {"mdgd-per-tensor": PerTensorEngine, "mdgd-recompute": RecomputeEngine}


def engine_class(mode: str) -> type[MDGDEngine]:
    """The engine class of a row of the step benchmark."""
    return VARIANTS.get(mode, MDGDEngine)
