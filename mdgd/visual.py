"""The visual representation pi(X^v | m) and the visual alignment loss L_v (Eq. 6).

The engine asks a *visual hook* three things:

* ``forward_kwargs``: extra keyword arguments for the model's forward;
* ``check(model, batch)``: raise a clear error for a batch it cannot use
  (called before anything runs);
* ``hook(model, batch, outputs) -> (z, mask)``: the representation ``z``
  (``[..., hidden]``) and a boolean ``mask`` (``z.shape[:-1]``, or None for all
  positions) of the visual positions;
* optionally ``is_text_only(model, batch) -> bool``: the batch has no visual
  position, so ``L_v = 0`` and the ``h`` backward is skipped (a hook without it
  treats every batch as visual).

:class:`ImageTokenHidden` is the default: the language model's last hidden layer
(after the final norm) at the positions where ``input_ids == image_token_id``.
It works for every HF family whose input ids carry one id per image token
(LLaVA, LLaVA-NeXT, PaliGemma, Qwen2-VL, Idefics3, ...). Write your own hook with
the same three members for another model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch


class VisualHook(Protocol):
    forward_kwargs: dict[str, Any]

    def check(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> None: ...

    def __call__(
        self, model: torch.nn.Module, batch: Mapping[str, Any], outputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class ImageTokenHidden:
    """``outputs.hidden_states[layer]`` at the image-token positions (docs/math.md §1)."""

    def __init__(self, layer: int = -1, image_token_id: int | None = None) -> None:
        self.layer = layer
        self.image_token_id = image_token_id
        self.forward_kwargs = {"output_hidden_states": True}

    def token_id(self, model: torch.nn.Module) -> int:
        if self.image_token_id is not None:
            return self.image_token_id
        cfg = getattr(model, "config", None)
        for key in ("image_token_id", "image_token_index"):
            tok = getattr(cfg, key, None)
            if tok is not None:
                return int(tok)
        raise ValueError(
            f"{type(model).__name__}.config has no image_token_id; pass "
            "ImageTokenHidden(image_token_id=...) as the engine's visual hook"
        )

    def check(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> None:
        if not isinstance(batch.get("input_ids"), torch.Tensor):
            raise ValueError("the batch needs 'input_ids' (a tensor) to find the image tokens")
        self.token_id(model)

    def is_text_only(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> bool:
        """No ``image_token_id`` in ``input_ids`` (free on CPU; one sync on an accelerator)."""
        return not bool((batch["input_ids"] == self.token_id(model)).any())

    def __call__(
        self, model: torch.nn.Module, batch: Mapping[str, Any], outputs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = outputs.hidden_states
        if hidden is None:
            raise ValueError(
                f"{type(model).__name__} returned no hidden_states with output_hidden_states=True"
            )
        return hidden[self.layer], batch["input_ids"] == self.token_id(model)


def visual_l1(z_ref: torch.Tensor, z: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``mean |z_ref - z|`` over the masked positions and all hidden units, in float32.

    Masking by multiplication keeps it free of host synchronisation (boolean
    indexing would need the count on the host). With no masked position (a
    text-only batch) it is exactly 0, and so is its gradient.
    """
    diff = (z_ref.float() - z.float()).abs()
    if mask is None:
        return diff.mean()
    m = mask.unsqueeze(-1)
    count = m.sum() * diff.shape[-1]
    return torch.where(m, diff, 0.0).sum() / count.clamp_min(1)
