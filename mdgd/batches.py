"""What one micro-batch brings to a step: images or not, supervised tokens or not.

LLaVA's instruction mix has text-only conversations, and answers can be
truncated away (every label -100). The driver handles both without a host
synchronisation beyond the image-token check:

* a micro-batch with no image token is *text-only*: its ``L_v`` is 0 and the
  ``h`` backward is not run; its task gradients add to ``g_theta`` and ``g_phi``
  as usual. A step whose micro-batches are all text-only still runs the op
  (``h = 0`` is the op's degenerate case: ``d = g_theta + k * g_phi``).
* a micro-batch with no supervised token has ``L_vl = 0`` (HF's mean over zero
  tokens is NaN), chosen on the device with ``torch.where`` on a flag computed
  from the labels, so a real NaN of a micro-batch that has supervised tokens
  stays NaN. Its gradients are zero; its ``L_v`` still counts.
* a step whose loss sums are NaN/Inf, or in which no micro-batch had a
  supervised token (no task signal), is a *non-finite step* in every mode:
  ``nonfinite="raise"`` raises, ``"skip"`` leaves every parameter and the
  optimizer state untouched.

The per-step counts (:meth:`MicroBatch.counts`) ride with the loss sums, so in a
multi-process run they are summed over the ranks with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
SKIPPED = 8  # index of "skipped" in mdgd.figures.FIGURES


def has_supervised_token(labels: torch.Tensor) -> torch.Tensor:
    """Bool ``[]`` on the labels' device: some position predicts a label (no sync).

    Causal LMs predict ``labels[..., 1:]`` (the first label is never a target).
    """
    return (labels[..., 1:] != IGNORE_INDEX).any()


def check_batch(batch: Any) -> None:
    """A micro-batch must be a dict of tensors with ``labels``."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"a batch must be a dict of tensors, got {type(batch).__name__}")
    if batch.get("labels") is None:
        raise ValueError("the batch has no 'labels': L_vl needs them (-100 marks ignored tokens)")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with its tensors moved to ``device`` (non-blocking)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def is_text_only(visual: Any, model: torch.nn.Module, batch: Mapping[str, Any]) -> bool:
    """Whether the visual hook finds no visual position in the batch (False if it cannot say)."""
    probe = getattr(visual, "is_text_only", None)
    return bool(probe(model, batch)) if probe is not None else False


@dataclass(frozen=True)
class MicroBatch:
    """The two facts about a micro-batch that change what the step computes."""

    text_only: bool  # no image token: L_v = 0, no h backward
    supervised: torch.Tensor  # bool [] on the device: some label is not -100

    @classmethod
    def of(
        cls, visual: Any, model: torch.nn.Module, batch: Mapping[str, Any], mode: str
    ) -> MicroBatch:
        text_only = mode != "ft" and is_text_only(visual, model, batch)
        return cls(text_only, has_supervised_token(batch["labels"]))

    def task_loss(self, outputs: Any, which: str) -> torch.Tensor:
        """``L_vl`` of ``outputs``: its loss, or 0 when the micro-batch has no supervised token."""
        loss = getattr(outputs, "loss", None)
        if loss is None:
            raise ValueError(f"{which} returned no loss: the batch needs labels")
        return torch.where(self.supervised, loss, torch.zeros_like(loss))

    def counts(self, device: torch.device) -> torch.Tensor:
        """``[text_only, supervised]`` as float32 on ``device`` (no sync)."""
        text = torch.full((), float(self.text_only), device=device)
        return torch.stack([text, self.supervised.float()])

    def check_loss_path(self, loss: torch.Tensor, names: Sequence[str]) -> bool:
        """Whether to run the task backward; a clear error when nothing trainable is used.

        A text-only micro-batch may leave every trainable parameter unused (e.g.
        only the projector is trained): it then contributes zero gradients.
        """
        if loss.requires_grad or self.text_only:
            return loss.requires_grad
        raise ValueError(
            f"no trainable parameter lies on the loss path: the loss does not depend on any "
            f"of the {len(names)} trainable parameter(s) (e.g. {names[0]}). Select parameters "
            "the forward uses, e.g. MDGDConfig(trainable=llava_trainable_patterns(model, "
            "num_layers=...)): the language-model layers and the projector"
        )


def step_figures(
    figures: torch.Tensor,
    losses: torch.Tensor,
    counts: torch.Tensor,
    n: int,
    mode: str,
    updated: torch.Tensor,
) -> torch.Tensor:
    """The step's figures with the non-finite rule applied and the last three appended.

    ``figures`` is the float64 vector in ``FIGURES`` order up to ``"skipped"``;
    ``losses`` and ``counts`` the three loss sums and the ``[text_only, supervised]``
    counts over the step's ``n`` micro-batches (all ranks); ``updated`` the
    ``updated_fraction`` (:mod:`mdgd.budget`).
    """
    text_only, supervised = counts.double().unbind()
    bad = (~torch.isfinite(losses).all()) | (supervised == 0)
    figures = figures.clone()
    figures[SKIPPED] = torch.maximum(figures[SKIPPED], bad.double())
    text = text_only / n if mode != "ft" else torch.full_like(text_only, math.nan)
    return torch.cat([figures, torch.stack([text, supervised / n, updated.double()])])


def nonfinite_reason(figures: Mapping[str, float], result: Any, names: Sequence[str]) -> str:
    """What made a step non-finite, for the error message."""
    if result is not None:
        bad = torch.nonzero(~torch.isfinite(result.stats).all(dim=1)).flatten().tolist()
        if bad:
            more = f" and {len(bad) - 1} more segment(s)" if len(bad) > 1 else ""
            return f"non-finite gradient (NaN or Inf) in {names[bad[0]]}{more}"
    if figures["supervised_fraction"] == 0.0:
        return "no supervised token (every label -100) in any micro-batch of the step"
    losses = ", ".join(f"{k}={figures[k]}" for k in ("loss", "loss_ref", "loss_v"))
    return f"non-finite loss ({losses})"
