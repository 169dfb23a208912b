"""A lean reference model: phi shares theta's frozen modules, and their forward runs once.

    from mdgd import reference_model

    ref = reference_model(model, trainable=patterns)   # before training changes model
    engine = MDGDEngine(model, ref, optimizer, MDGDConfig(trainable=patterns))

MDGD needs the pre-trained model phi beside theta, but only phi's *trainable* parameters
ever differ from theta's: the frozen ones are the same weights in both, forever. So
:func:`reference_model` copies what is trainable and shares the rest. In the paper's
setting (LLaVA-1.5-7B, 1.24B of 7.06B parameters trainable) that drops 5.82B
parameters, 11.6 GB in bf16, from every GPU that holds both models.

What phi shares with theta (the same Python objects, not equal copies):

* every *maximal* submodule whose parameters are all frozen and whose forward does not
  depend on train/eval mode (the vision tower, the embeddings, the frozen decoder layers,
  the final norm, ``lm_head``, parameter-free modules such as the rotary embedding);
* the frozen parameters of the modules it copies (a ``Linear`` with a trainable weight
  and a frozen bias shares the bias).

A module whose forward depends on the mode (dropout with ``p > 0``, batch norm) is
copied even when frozen: the engine runs phi in eval mode while theta trains, and one
module object has one mode. Everything else that phi holds is a deep copy made at the
call, so build phi **before training changes theta**: its trainable parameters are the
pre-trained values only at that moment. Tied weights stay tied within each model.

:func:`shared_forward` is the other half: where the vision tower is one module object
in both models and frozen, the engine's paired forward (theta, then phi, on one
micro-batch) runs it once; phi gets theta's output. :func:`unshare` turns a lean phi
back into a full copy, in place, for the wrappers that shard each model on its own
(DeepSpeed, accelerate's FSDP2 plugin, FSDP2 with sharded frozen weights).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import mark_trainable

VISION_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder")
"""Attribute names of the vision encoder in the MLLM families of :mod:`mdgd.families`
(LLaVA, PaliGemma, Gemma3: ``vision_tower``; Idefics: ``vision_model``; Qwen: ``visual``)."""

_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


def reference_model(model: nn.Module, trainable: Sequence[str] | None = None) -> nn.Module:
    """phi for MDGD: theta's frozen modules shared, its trainable ones copied.

    Args:
        model: theta, unwrapped (build phi before FSDP2 or DeepSpeed wraps theta).
        trainable: regular expressions over parameter names, applied to ``model`` with
            :func:`mdgd.mark_trainable` first; None: ``model``'s ``requires_grad`` flags
            say what is trainable.

    Returns a model of ``model``'s class, equal to ``copy.deepcopy(model)`` in every
    parameter and buffer, built before training changes ``model``. Its frozen modules
    are ``model``'s own (see the module docstring); :func:`shared_bytes` counts them.
    Training changes only the trainable parameters, which phi holds as its own copies;
    do not unfreeze a shared parameter later (the engine refuses a phi that shares a
    trainable parameter with theta).
    """
    from .distributed import is_deepspeed, is_fsdp

    if is_fsdp(model) or is_deepspeed(model):
        raise ValueError(
            "model is already wrapped by FSDP2 or DeepSpeed: build the reference model from "
            "the unwrapped model, before wrapping either"
        )
    if trainable is not None:
        mark_trainable(model, trainable)
    shared = shareable_modules(model)
    if any(m is model for m in shared):
        raise ValueError(
            f"{type(model).__name__} has no trainable parameter, so its reference model would "
            "be the model itself: mark the trainable parameters first (trainable=[...] or "
            "mdgd.mark_trainable)"
        )
    # deepcopy takes what is in the memo as it is: the shared modules, and the frozen
    # parameters of the modules it copies
    memo: dict[int, Any] = {id(m): m for m in shared}
    memo.update({id(p): p for p in model.parameters() if not p.requires_grad})
    return copy.deepcopy(model, memo)


def shareable_modules(model: nn.Module) -> list[nn.Module]:
    """The maximal submodules of ``model`` with only frozen parameters (or none) and a
    forward that does not depend on train/eval mode, in module order."""
    ok: dict[int, bool] = {}

    def mark(module: nn.Module) -> bool:
        if id(module) not in ok:
            kids = [mark(c) for c in module.children()]  # every child, for collect below
            own = all(not p.requires_grad for p in module.parameters(recurse=False))
            ok[id(module)] = own and not _mode_dependent_here(module) and all(kids)
        return ok[id(module)]

    out: list[nn.Module] = []
    seen: set[int] = set()

    def collect(module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if ok[id(module)]:
            out.append(module)
            return
        for child in module.children():
            collect(child)

    mark(model)
    collect(model)
    return out


def _mode_dependent_here(module: nn.Module) -> bool:
    """The module's own forward (not its children's) may change with train/eval mode:
    a dropout module with ``p > 0``, batch norm, or a float attribute with "drop" in
    its name above 0 (transformers' ``attention_dropout``, CLIP's ``dropout``)."""
    if isinstance(module, _MODE_DEPENDENT):
        return not isinstance(module, nn.modules.dropout._DropoutNd) or module.p > 0
    return any(
        "drop" in name and isinstance(v, float) and v > 0 for name, v in vars(module).items()
    )


def mode_dependent(module: nn.Module) -> bool:
    """Some submodule of ``module`` (itself included) behaves differently in train mode."""
    return any(_mode_dependent_here(m) for m in module.modules())


def shared_bytes(model: nn.Module, ref_model: nn.Module) -> int:
    """Bytes of the parameters and buffers ``ref_model`` holds that are ``model``'s own
    (what :func:`reference_model` saves against ``copy.deepcopy``), each counted once."""
    mine = {id(t) for t in [*model.parameters(), *model.buffers()]}
    theirs = {id(t): t for t in [*ref_model.parameters(), *ref_model.buffers()]}
    return sum(t.numel() * t.element_size() for i, t in theirs.items() if i in mine)


def shares_modules(model: nn.Module, ref_model: nn.Module) -> bool:
    """``ref_model`` holds a module or a parameter that is ``model``'s."""
    mine = {id(m) for m in model.modules()} | {id(p) for p in model.parameters()}
    return any(id(m) in mine for m in ref_model.modules()) or any(
        id(p) in mine for p in ref_model.parameters()
    )


def unshare(ref_model: nn.Module, model: nn.Module) -> int:
    """Give ``ref_model`` its own copies of what it shares with ``model``, in place.

    Afterwards ``ref_model`` is what ``copy.deepcopy(model)`` was when it was built: a
    full copy, for the wrappers that shard each model on its own (one module object
    cannot be sharded for two models). Returns the bytes copied (0 when nothing was
    shared). Ties between shared parameters are kept (one memo for all the copies).
    """
    copied = shared_bytes(model, ref_model)
    mine_modules = {id(m) for m in model.modules()}
    mine_tensors = {id(t) for t in [*model.parameters(), *model.buffers()]}
    memo: dict[int, Any] = {}
    for parent in list(ref_model.modules()):
        if id(parent) in mine_modules:
            continue  # a shared module: replaced in its parent as a whole
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in mine_modules:
                parent._modules[name] = copy.deepcopy(child, memo)
        for table in (parent._parameters, parent._buffers):
            for name, t in list(table.items()):
                if t is not None and id(t) in mine_tensors:
                    table[name] = copy.deepcopy(t, memo)
    return copied


# ---------------------------------------------------------------------- one forward for two


def shared_forward(model: nn.Module, ref_model: nn.Module | None) -> SharedForward:
    """The frozen vision encoder that ``model`` and ``ref_model`` share, as a context in
    which its forward runs once for both (see :class:`SharedForward`)."""
    if ref_model is None:
        return SharedForward([])
    theirs = {id(m) for m in ref_model.modules()}
    found = [
        m
        for name, m in model.named_modules()
        if name.rpartition(".")[2] in VISION_NAMES and id(m) in theirs
    ]
    top = [m for m in found if not any(m is not o and _contains(o, m) for o in found)]
    return SharedForward(top)


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


class SharedForward:
    """A context in which each of ``modules`` computes once for two calls on one input.

    Meant for a frozen module that theta and phi share (:func:`reference_model`), called
    by theta's forward and then by phi's on the same tensors: the first call runs and its
    output is kept, a second call with the same inputs gets it instead of running, and
    the slot empties. Only inside the ``with`` block (the engine enters it around the two
    forwards of one micro-batch, so nothing outlives the micro-batch) and only when
    reusing cannot change a result:

    * the inputs are the very same tensors, unmodified (identity and version counter),
      none needing a gradient, with equal other arguments, grad mode and autocast state;
    * the output needs no gradient, or every parameter of the module is frozen: a graph
      then leads only to tensors made inside the module (transformers'
      ``enable_input_require_grads`` hook, on under activation checkpointing, makes the
      patch embeddings require grad), whose gradients nobody reads; the second call gets
      the output detached, so its backward stops there;
    * the output was not modified in place in between (version counters);
    * the module is not in train mode with dropout or batch norm inside.

    Otherwise the module runs as usual.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self._slots = [_Slot(m) for m in self.modules]

    def __bool__(self) -> bool:
        return bool(self.modules)

    def __enter__(self) -> SharedForward:
        for slot in self._slots:
            slot.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        for slot in self._slots:
            slot.remove()


_MISSING = object()


class _Slot:
    """One module's one-entry cache, installed as its instance ``forward`` (module hooks,
    FSDP2's among them, stay outside) while the context is open."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.mode_dependent = mode_dependent(module)
        self.frozen = not any(p.requires_grad for p in module.parameters())
        self.entry: tuple | None = None
        self.inner: Any = None
        self.before: Any = _MISSING

    def install(self) -> None:
        self.before = vars(self.module).get("forward", _MISSING)
        self.inner = self.module.forward
        self.module.forward = self

    def remove(self) -> None:
        self.entry = self.inner = None
        if self.before is _MISSING:
            del self.module.forward
        else:
            self.module.forward = self.before
        self.before = _MISSING

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.mode_dependent and self.module.training:
            return self.inner(*args, **kwargs)
        key = _key(args, kwargs, self.module.training)
        entry, self.entry = self.entry, None  # one use, hit or miss
        if key is not None and entry is not None and entry[0] == key:
            if _versions(entry[1]) == entry[2]:
                return entry[1]
        out = self.inner(*args, **kwargs)
        if key is not None and (self.frozen or not any(t.requires_grad for t in _tensors(out))):
            kept = _detached(out)
            if kept is not _MISSING:
                # the inputs are held so that their ids cannot be reused while the entry lives
                self.entry = (key, kept, _versions(kept), (args, kwargs))
        return out


_SCALARS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _key(args: tuple, kwargs: dict, training: bool) -> tuple | None:
    """What must match for two calls to compute the same: tensors by identity and
    version, plain values by value; None when an argument is of another kind or a
    tensor needs a gradient."""
    parts: list[Any] = [training, torch.is_grad_enabled()]
    device_type = None
    for name, value in [*enumerate(args), *sorted(kwargs.items())]:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                return None
            parts.append((name, id(value), value._version))
            device_type = device_type or value.device.type
        elif isinstance(value, _SCALARS):
            parts.append((name, type(value), value))
        else:
            return None
    if device_type is not None:
        parts.append(
            (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        )
    return tuple(parts)


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for x in out for t in _tensors(x)]
    return []


def _detached(out: Any) -> Any:
    """``out`` with its tensors detached, in new containers (a caller may set attributes
    on a ``ModelOutput``); ``_MISSING`` for an output of another kind."""
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, _SCALARS):
        return out
    if isinstance(out, (dict, list, tuple)):
        items = out.items() if isinstance(out, dict) else enumerate(out)
        done = {k: _detached(v) for k, v in items}
        if any(v is _MISSING for v in done.values()):
            return _MISSING
        if isinstance(out, dict):
            return type(out)(**done) if hasattr(out, "to_tuple") else type(out)(done)
        if hasattr(out, "_fields"):  # a namedtuple
            return type(out)(*done.values())
        return type(out)(done.values())
    return _MISSING


def _versions(out: Any) -> tuple[int, ...]:
    return tuple(t._version for t in _tensors(out))
