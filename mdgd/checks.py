"""The checks :class:`mdgd.MDGDEngine` makes when it is built, before any buffer exists.

* :func:`trainable_params`: theta's trainable parameters (``MDGDConfig.trainable``
  applied to both models, or theta's ``requires_grad`` flags);
* :func:`check_same_architecture`: phi is theta's architecture and configuration;
* :func:`matching_params`: phi's twins of theta's trainable parameters, separate
  from theta's (phi's other parameters are frozen, and may be theta's own:
  :func:`mdgd.reference_model`);
* :func:`check_optimizer`: the optimizer holds theta's trainable parameters and
  none of phi's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .buffers import local_tensor
from .config import mark_trainable
from .distributed import canonical_name, global_shape
from .families import check_same_config


def trainable_params(
    model: nn.Module, ref_model: nn.Module | None, patterns: Sequence[str] | None
) -> list[tuple[str, nn.Parameter]]:
    """theta's trainable ``(name, parameter)``: ``patterns`` marked on both models, if given."""
    if patterns is not None:
        named = mark_trainable(model, patterns)
        if ref_model is not None:
            mark_trainable(ref_model, patterns)
        return named
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            f"{type(model).__name__} has no parameter with requires_grad=True; set "
            "MDGDConfig(trainable=[...]) (see llava_trainable_patterns) or mark_trainable()"
        )
    return named


def check_same_architecture(model: nn.Module, ref_model: nn.Module) -> None:
    """Same class, same parameter names and shapes (every parameter, not only the trainable)."""
    hint = (
        "MDGD compares two models of one architecture (pass a frozen copy of the pre-trained model)"
    )
    if type(ref_model) is not type(model):
        raise ValueError(
            f"ref_model is a {type(ref_model).__name__} but model is a {type(model).__name__}: "
            + hint
        )
    # whole shapes: ZeRO-3 partitions some parameters and keeps others whole
    mine = {canonical_name(n): global_shape(p) for n, p in model.named_parameters()}
    theirs = {canonical_name(n): global_shape(p) for n, p in ref_model.named_parameters()}
    if mine != theirs:
        only = sorted(set(mine) ^ set(theirs))
        if only:
            where = "model" if only[0] in mine else "ref_model"
            what = f"{only[0]!r} exists only in {where} ({len(only)} such parameter(s))"
        else:
            name = next(n for n in mine if mine[n] != theirs[n])
            what = f"{name!r} is {theirs[name]} in ref_model but {mine[name]} in model"
        raise ValueError(f"ref_model's architecture differs from model's: {what}; " + hint)
    check_same_config(model, ref_model)


def matching_params(
    model: nn.Module, ref_model: nn.Module, named: list[tuple[str, nn.Parameter]]
) -> list[nn.Parameter]:
    """phi's parameters with theta's trainable names; phi's other parameters are frozen."""
    ref = {canonical_name(n): q for n, q in ref_model.named_parameters()}
    theta_ids = {id(p) for p in model.parameters()}
    out = []
    for name, p in named:
        q = ref.get(canonical_name(name))
        if q is None:
            raise ValueError(f"ref_model has no parameter {name!r}: the architectures differ")
        if global_shape(q) != global_shape(p) or q.dtype != p.dtype:
            raise ValueError(
                f"{name}: ref_model has {global_shape(q)} {q.dtype}, model has "
                f"{global_shape(p)} {p.dtype}; the two models must match"
            )
        q_local, p_local = local_tensor(q), local_tensor(p)
        shared = q_local.numel() > 0 and q_local.data_ptr() == p_local.data_ptr()
        if id(q) in theta_ids or shared:
            raise ValueError(
                f"ref_model shares parameter {name!r}, a trainable one, with model; pass a copy "
                "made before training: mdgd.reference_model(model, trainable) once the "
                "trainable set is final (it shares only frozen modules), or copy.deepcopy(model)"
            )
        out.append(q)
    trainable = {canonical_name(name) for name, _ in named}
    for name, q in ref.items():
        q.requires_grad_(name in trainable)
    return out


def check_optimizer(
    optimizer: torch.optim.Optimizer,
    ref_model: nn.Module | None,
    names: Sequence[str],
    params: Sequence[nn.Parameter],
) -> None:
    """``optimizer`` holds every one of theta's trainable ``params`` and none of phi's."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if ref_model is not None:
        # phi's frozen parameters may be theta's own (mdgd.reference_model): only phi's
        # trainable ones, never theta's, mark a mistake
        bad = [n for n, p in ref_model.named_parameters() if id(p) in held and p.requires_grad]
        if bad:
            raise ValueError(
                f"the optimizer holds {len(bad)} parameter(s) of ref_model (e.g. {bad[0]}); "
                "ref_model is frozen: give the optimizer theta's parameters only"
            )
    missing = [n for n, p in zip(names, params) if id(p) not in held]
    if missing:
        raise ValueError(
            f"the optimizer does not hold {len(missing)} trainable parameter(s) of model "
            f"(e.g. {missing[0]}); build it after marking the trainable parameters, e.g. "
            "from [p for p in model.parameters() if p.requires_grad]"
        )
