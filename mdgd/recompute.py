"""Activation checkpointing of the reference model (phi) in eval mode.

transformers recomputes a layer in backward only when the layer is in
``train()`` mode (``GradientCheckpointingLayer`` checks ``self.training``). The
engine keeps phi in ``eval()`` (no dropout, frozen), so ``model.
activation_checkpointing_enable()`` alone leaves phi keeping every activation of
its forward for the two backward calls, while theta recomputes. MDGD needs
phi's graph (``g_phi`` and ``h_phi``), so phi's activations cost as much as
theta's.

:func:`recompute_layers` makes every such layer of a model recompute in
backward whatever its mode: it wraps the layer's ``forward`` (not its
``__call__``, so module hooks such as FSDP2's stay outside the recomputed
region, as transformers does) in non-reentrant ``torch.utils.checkpoint``.
Parameter names and the state dict do not change. Each checkpointed layer then
runs its forward 3 times per micro-batch (the forward, and a recompute in each
of the two backward calls).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def recompute_layers(model: nn.Module) -> int:
    """Recompute every transformer layer of ``model`` in backward, in eval mode too.

    Returns the number of layers wrapped (0 when there is none, e.g. a model
    without transformers' ``GradientCheckpointingLayer``). Idempotent.
    """
    from .distributed.shard import transformer_layers

    count = 0
    for layer in transformer_layers(model):
        if not isinstance(vars(layer).get("forward"), functools.partial):
            layer.forward = functools.partial(_checkpointed, layer.forward)
        count += 1
    return count


def is_recomputing(model: nn.Module) -> bool:
    """True when transformers' activation checkpointing is on for ``model``."""
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    for key in _CACHE_KWARGS:  # a recompute would write the cache a second time
        if kwargs.get(key) is not None:
            kwargs[key] = None
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
