"""``shard_models``: wrap theta and phi with FSDP2 the same way.

MDGD's FSDP2 mode needs every trainable parameter of theta and its twin in phi
sharded alike (same units, ``Shard(0)``, same local shapes), so that the four
local gradient shards line up element by element. :func:`shard_models` wraps
each transformer layer of both models (every vision-encoder and decoder layer:
the modules transformers builds on ``GradientCheckpointingLayer``, or else the
items of every ``...layers`` ``ModuleList``), then each root.

A lean phi (:func:`mdgd.reference_model`) holds theta's frozen modules themselves. FSDP2
cannot shard one module for two roots: each root claims every FSDP unit below it when it
first runs (``FSDPState._lazy_init``), so with the shared units wrapped once, through
theta, phi's first forward fails with "FSDP state has already been lazily initialized"
(torch 2.13, 2 gloo ranks). So with ``shard_frozen=True`` phi gets its own copies of what
it shares first (:func:`mdgd.reference.unshare`: the full copy, the deep copy's memory),
and with ``shard_frozen=False`` the shared modules stay shared, outside FSDP2 (their
parameters are frozen, hence ignored and replicated anyway): no unit is made of them in
either model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .common import canonical_name, is_fsdp


def shard_models(
    model: nn.Module,
    ref_model: nn.Module | None,
    *,
    mesh: Any = None,
    mp_policy: Any = None,
    reshard_after_forward: bool | int = True,
    shard_frozen: bool = True,
) -> tuple[nn.Module, nn.Module | None]:
    """Wrap ``model`` (theta) and ``ref_model`` (phi) with ``fully_shard`` alike.

    Mark the trainable parameters of ``model`` first (``mark_trainable``): phi's
    parameters with the same names get ``requires_grad=True``, the others False.

    Args:
        mesh: a 1-D ``DeviceMesh`` over the data-parallel ranks (default: FSDP2's,
            the world).
        mp_policy: FSDP2's ``MixedPrecisionPolicy`` (default: none).
        reshard_after_forward: FSDP2's option, for every unit. ``True`` frees the
            gathered weights after each forward (each micro-batch then gathers
            every layer about 3 times per model); ``False`` keeps them until the
            backward is done (less traffic, more memory).
        shard_frozen: ``False`` leaves the frozen parameters (``requires_grad``
            False, in both models) out of FSDP2 (``ignored_params``): they stay
            whole and replicated on every rank and are never all-gathered. That
            saves the all-gather traffic of the frozen weights at the cost of
            holding them in full on every rank (docs/distributed.md has the
            numbers). A lean ``ref_model`` (:func:`mdgd.reference_model`) keeps
            sharing theta's frozen modules only then; with ``True`` it is given its
            own copies of them first (module docstring).

    Returns ``(model, ref_model)``, wrapped in place (FSDP2 changes the classes).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for which, m in (("model", model), ("ref_model", ref_model)):
        if is_fsdp(m):
            raise ValueError(f"{which} is already wrapped by FSDP2: pass the unwrapped models")
    shared: set[int] = set()
    if ref_model is not None:
        _match_requires_grad(model, ref_model)
        if shard_frozen:
            from ..reference import unshare

            unshare(ref_model, model)
        else:
            shared = {id(m) for m in model.modules()} & {id(m) for m in ref_model.modules()}
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "mp_policy": mp_policy if mp_policy is not None else MixedPrecisionPolicy(),
        "reshard_after_forward": reshard_after_forward,
    }
    for m in (model, ref_model):
        if m is None:
            continue
        ignored = None if shard_frozen else {p for p in m.parameters() if not p.requires_grad}
        for layer in transformer_layers(m):
            if id(layer) not in shared:  # frozen, replicated: nothing for FSDP2 to do
                fully_shard(layer, ignored_params=ignored, **kwargs)
        fully_shard(m, ignored_params=ignored, **kwargs)
    return model, ref_model


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 wraps one by one (vision-encoder and decoder layers)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers is optional for plain PyTorch models
        GradientCheckpointingLayer = ()  # noqa: N806
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if layers:
        return layers
    return [
        block
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and name.split(".")[-1] == "layers"
        for block in m
    ]


def _match_requires_grad(model: nn.Module, ref_model: nn.Module) -> None:
    """phi's ``requires_grad`` flags from theta's, by name (the engine does the same)."""
    trainable = {canonical_name(n) for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(
            f"{type(model).__name__} has no parameter with requires_grad=True: mark the "
            "trainable parameters (mdgd.mark_trainable) before shard_models"
        )
    for n, q in ref_model.named_parameters():
        q.requires_grad_(canonical_name(n) in trainable)


def shard_like(ref_model: nn.Module, model: nn.Module) -> nn.Module:
    """Wrap ``ref_model`` (phi) with ``fully_shard`` the way ``model`` (theta) is wrapped.

    For a theta that something else wrapped, e.g. accelerate's FSDP2 plugin in
    ``prepare``: every FSDP unit of theta (by module name, wrapper prefixes
    removed) gets a unit in phi, innermost first, on theta's mesh, with the
    unit's mixed-precision policy and its ``reshard_after_forward`` (read from
    FSDP2's per-module state; defaults when a torch version hides them).
    """
    from torch.distributed.fsdp import fully_shard

    if is_fsdp(ref_model):
        raise ValueError("ref_model is already wrapped by FSDP2")
    from ..reference import shares_modules

    if shares_modules(model, ref_model):
        raise ValueError(
            "ref_model shares frozen modules with model (mdgd.reference_model), which FSDP2 "
            "already sharded for model alone: give ref_model its own copies before model is "
            "wrapped (mdgd.reference.unshare(ref_model, model); MDGDTrainer does so), or "
            "build it with copy.deepcopy"
        )
    units = {canonical_name(n): m for n, m in model.named_modules() if is_fsdp(m)}
    if not units:
        raise ValueError("model is not wrapped by FSDP2: use shard_models(model, ref_model)")
    _match_requires_grad(model, ref_model)
    _match_trainable_dtypes(model, ref_model)
    mine = {canonical_name(n): m for n, m in ref_model.named_modules()}
    missing = sorted(set(units) - set(mine))
    if missing:
        raise ValueError(f"ref_model has no module {missing[0]!r} (an FSDP unit of model)")
    for name in sorted(units, key=lambda n: (n == "", -n.count("."))):  # innermost first, root last
        fully_shard(mine[name], **_unit_options(units[name]))
    return ref_model


def _unit_options(unit: nn.Module) -> dict[str, Any]:
    """``fully_shard`` options of an FSDP2 unit: mesh, mp_policy, reshard_after_forward."""
    state = unit._get_fsdp_state()
    group = next(iter(getattr(state, "_fsdp_param_groups", [])), None)
    out: dict[str, Any] = {}
    if getattr(state, "_mp_policy", None) is not None:
        out["mp_policy"] = state._mp_policy
    if group is not None:
        out["mesh"] = group.mesh_info.mesh
        out["reshard_after_forward"] = group.post_forward_mesh_info is not None
    return out


def _match_trainable_dtypes(model: nn.Module, ref_model: nn.Module) -> None:
    """phi's trainable parameters in theta's dtypes (accelerate's FSDP2 preparation
    upcasts theta's trainable parameters to float32 under mixed precision)."""
    dtypes = {canonical_name(n): p.dtype for n, p in model.named_parameters() if p.requires_grad}
    for n, q in ref_model.named_parameters():
        want = dtypes.get(canonical_name(n))
        if want is not None and q.dtype != want:
            q.data = q.data.to(want)
