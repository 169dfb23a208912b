"""MDGD on DeepSpeed ZeRO (``distributed="deepspeed"``): stages 1, 2 and 3.

Both models are DeepSpeed engines of the same configuration
(:func:`deepspeed_models`): theta's with the run's optimizer, phi's with an
optimizer that never steps (ZeRO has no gradients without one; phi's trainable
parameters need ``g_phi`` and ``h_phi``). Only DeepSpeed's public gradient API
is used (``deepspeed.utils.safe_*``); no ZeRO internals.

Per micro-batch, for each of the two gradients (``g`` of ``L_vl``, then ``h``
of ``L_v``):

1. every engine is told that this backward is a gradient-accumulation
   boundary (``set_gradient_accumulation_boundary(True)``), so that ZeRO
   reduces it at once, and runs ``engine.backward(loss, scale_wrt_gas=False)``
   on its own model's loss (``L_v`` once per model, the other model's side
   detached: the same value, and each model's gradient of it);
2. the reduced gradient is added into mdgd's buffer: ZeRO-3 hands out this
   rank's partition (``safe_get_local_grad``), ZeRO-1/2 the full averaged
   gradient (``safe_get_full_grad``, one all-reduce per parameter);
3. zeros are written back into ZeRO's partitions and
   ``engine.optimizer.zero_grad()`` runs: ZeRO-3 would otherwise add the next
   backward into the same partition, ZeRO-2 overwrites it (two opposite
   traps, both silent), and a parameter the next backward does not reach (the
   vision side on a text-only micro-batch) would be read again with its stale
   gradient, or with the last step's direction (ZeRO-3 only copies into the
   partitions of parameters that got one, and keeps the direction after the
   step, so zeros are written after every step too; ZeRO-2 with
   ``grad_accum_dtype`` fp32 never clears them).

ZeRO-3 frees the gathered weights after a backward, so the ``h`` backward runs
on a second forward of both models (the engine replays the first one's random
state). ZeRO-1/2 keep whole weights and reuse the first forward's graph.

At the step the op runs on the buffers (ZeRO-3: this rank's partitions, one
all-reduce of the ``[S, 10]`` statistics, :mod:`mdgd.distributed.shards`;
ZeRO-1/2: the full buffers, identical on every rank), the direction is written
back (``safe_set_local_grad`` / ``safe_set_full_grad``), and theta's engine
steps: DeepSpeed clips the direction's global norm (its ``gradient_clipping``)
and steps its optimizer and scheduler. ZeRO averages over the ranks, so the
direction is scaled by ``1 / micro-batches``. A skipped step writes nothing
and does not step the engine (its scheduler still steps).

MDGD-GM: a parameter with no selected segment gets a zero direction, and it and
its optimizer state are restored after the step, as are the unselected blocks
of a partly selected one under ``freeze_unselected``; DeepSpeed's optimizer
counts steps per flat group, so AdamW's bias correction of a parameter that
sat a step out runs one step ahead of one process's (docs/distributed.md).

Not supported (a ValueError at construction names the key): fp16 (its dynamic
loss scale would see only part of MDGD's gradients), optimizer or parameter
offload (untested), pipeline or tensor parallelism, ZeRO stage 0.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import MDGDConfig, mark_trainable
from .common import (
    Collectives,
    canonical_name,
    check_same_modality,
    fingerprint,
    global_shape,
    is_deepspeed,
    raised_by_a_collective,
)
from .exchange import GradExchange
from .shards import ShardedExchange

MIN_VERSION = "0.18.5"
"""``safe_set_local_grad`` / ``safe_set_full_grad`` exist from 0.15.3, but the
backward that the reads rely on was reworked up to 0.18.5; the traps were
measured on 0.19.8, and CI tests the newest release."""


def check_version() -> Any:
    """Import deepspeed and check its version; returns the module."""
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            "distributed='deepspeed' needs DeepSpeed: pip install deepspeed "
            f"(>= {MIN_VERSION}; on a CPU-only machine set DS_ACCELERATOR=cpu)"
        ) from e
    from packaging.version import Version

    if Version(deepspeed.__version__.split("+")[0]) < Version(MIN_VERSION):
        raise ImportError(
            f"mdgd needs deepspeed >= {MIN_VERSION} (its public gradient API), found "
            f"{deepspeed.__version__}: pip install -U deepspeed"
        )
    return deepspeed


def deepspeed_models(
    model: nn.Module,
    ref_model: nn.Module | None,
    config: Mapping[str, Any],
    *,
    optimizer: Any = None,
    lr_scheduler: Any = None,
) -> tuple[Any, Any]:
    """DeepSpeed engines of theta (``model``) and phi (``ref_model``) for one config.

    Mark the trainable parameters of ``model`` first (``mark_trainable``): phi's
    parameters with the same names get ``requires_grad=True``, the others False.
    ``optimizer`` and ``lr_scheduler`` are theta's (a torch optimizer over the
    trainable parameters, or None when ``config`` has an ``"optimizer"`` block),
    as ``deepspeed.initialize`` takes them. phi's engine gets the same config
    without optimizer and scheduler blocks and ``torch.optim.SGD(lr=0)``, which
    never steps; it costs phi's fp32 master partitions and gradient partitions
    (docs/distributed.md has the bytes).

    A lean phi (:func:`mdgd.reference_model`) is given its own copies of theta's
    frozen modules first (:func:`mdgd.reference.unshare`).

    Returns ``(engine, ref_engine)``; pass both to :class:`mdgd.MDGDEngine`.
    """
    from ..reference import unshare

    deepspeed = check_version()
    if ref_model is not None:
        unshare(ref_model, model)  # each engine partitions its own module tree
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(
            f"{type(model).__name__} has no parameter with requires_grad=True: mark the "
            "trainable parameters (mdgd.mark_trainable) before deepspeed_models"
        )
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=trainable if optimizer is None else None,
        lr_scheduler=lr_scheduler,
        config=dict(config),
    )
    ref_engine = None
    if ref_model is not None:
        ref_engine = reference_engine(ref_model, model, config)
    return engine, ref_engine


def reference_engine(ref_model: nn.Module, model: nn.Module, config: Mapping[str, Any]) -> Any:
    """phi's engine: theta's trainable names trainable, never stepped (see
    :func:`deepspeed_models`)."""
    deepspeed = check_version()
    names = {canonical_name(n) for n, p in _module(model).named_parameters() if p.requires_grad}
    for n, q in ref_model.named_parameters():
        q.requires_grad_(canonical_name(n) in names)
    params = [q for q in ref_model.parameters() if q.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=ref_model,
        optimizer=torch.optim.SGD(params, lr=0.0),
        config=reference_config(config),
    )
    return engine


def reference_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """theta's DeepSpeed config for phi's engine: no optimizer or scheduler block (phi
    has a client optimizer that never steps), which ZeRO then accepts untested."""
    out = copy.deepcopy(dict(config))
    out.pop("optimizer", None)
    out.pop("scheduler", None)
    out["zero_allow_untested_optimizer"] = True
    return out


def _module(model: nn.Module) -> nn.Module:
    return model.module if is_deepspeed(model) else model


def _stage(engine: Any) -> int:
    return int(engine.zero_optimization_stage())


def config_unsupported(config: Mapping[str, Any], fp16: bool = False) -> str | None:
    """:func:`unsupported` read from a config dict, before any engine exists (the
    Trainer's constructor): fp16, stage 0, optimizer or parameter offload."""
    if fp16 or (config.get("fp16") or {}).get("enabled") is True:
        return (
            '"fp16": {"enabled": true} (--fp16): the loss scaler would check only part of '
            "MDGD's gradients; train in bf16 (--bf16) instead"
        )
    zero = config.get("zero_optimization") or {}
    if int(zero.get("stage", 0)) == 0:
        return '"zero_optimization": {"stage": 0}: use stage 1, 2 or 3'
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            return f'"zero_optimization": {{"{key}": {{"device": "{device}"}}}}: not supported yet'
    return None


def unsupported(engine: Any) -> str | None:
    """Why MDGD cannot run on ``engine``'s configuration, naming the key; None if it can."""
    if engine.fp16_enabled():
        return (
            '"fp16": {"enabled": true}: the loss scaler would check only part of MDGD\'s '
            'gradients; train in bf16 ("bf16": {"enabled": true}) instead'
        )
    if _stage(engine) == 0:
        return (
            '"zero_optimization": {"stage": 0}: use stage 1, 2 or 3, or unwrapped models '
            "(distributed='dp')"
        )
    if type(engine.optimizer).__name__ == "BF16_Optimizer":
        return (
            '"data_types": {"grad_accum_dtype": "fp32"} with bf16 on ZeRO-1: DeepSpeed then '
            "uses its BF16_Optimizer, which ignores gradients set through its API; remove "
            "the key or use ZeRO-2/3"
        )
    if engine.zero_offload_optimizer():
        return '"zero_optimization": {"offload_optimizer": ...}: remove it (not supported yet)'
    if engine.zero_offload_param():
        return '"zero_optimization": {"offload_param": ...}: remove it (not supported yet)'
    if engine.dp_world_size != dist.get_world_size():
        return (
            f"data-parallel size {engine.dp_world_size} of {dist.get_world_size()} ranks "
            "(model, pipeline or sequence parallelism): MDGD supports pure data parallelism"
        )
    return None


class DeepSpeedExchange(GradExchange):
    """The ``"deepspeed"`` strategy: :class:`ZeRO3Exchange` or :class:`ZeRO12Exchange`
    by the engines' stage (module doc)."""

    mode = "deepspeed"

    @classmethod
    def unwrapped(
        cls, model: nn.Module, ref_model: nn.Module | None, config: MDGDConfig
    ) -> tuple[nn.Module, nn.Module | None]:
        check_version()
        for which, eng in (("model", model), ("ref_model", ref_model)):
            if eng is None:
                continue
            why = unsupported(eng)
            if why is not None:
                raise ValueError(f"MDGD cannot run on {which}'s DeepSpeed config {why}")
        if ref_model is not None and _stage(model) != _stage(ref_model):
            raise ValueError(
                f"model is a ZeRO-{_stage(model)} engine but ref_model a ZeRO-{_stage(ref_model)} "
                "one: build both from one config (mdgd.deepspeed_models)"
            )
        clip = model.gradient_clipping()
        if config.max_grad_norm is not None and clip != config.max_grad_norm:
            raise ValueError(
                f"MDGDConfig.max_grad_norm={config.max_grad_norm} but the DeepSpeed config has "
                f'"gradient_clipping": {clip}: DeepSpeed clips the direction, so set '
                '"gradient_clipping" there and leave max_grad_norm None'
            )
        module = model.module
        if config.trainable is not None:  # ZeRO built its partitions from the flags already
            before = {n: p.requires_grad for n, p in module.named_parameters()}
            mark_trainable(module, config.trainable)
            changed = [n for n, p in module.named_parameters() if p.requires_grad != before[n]]
            for n, p in module.named_parameters():
                p.requires_grad_(before[n])
            if changed:
                raise ValueError(
                    f"MDGDConfig.trainable would change requires_grad of {len(changed)} "
                    f"parameter(s) (e.g. {changed[0]}) of a DeepSpeed engine: mark them before "
                    "deepspeed.initialize (mdgd.mark_trainable, then mdgd.deepspeed_models)"
                )
        return module, None if ref_model is None else ref_model.module

    @classmethod
    def build(cls, config, names, theta_params, phi_params, models, process_group=None):
        sub = ZeRO3Exchange if _stage(models[0]) == 3 else ZeRO12Exchange
        return sub(config, names, theta_params, phi_params, models)


class _DeepSpeedSteps:
    """What both stages share: the backward calls, the reads, the step, the checkpoints."""

    mode = "deepspeed"
    supports_scaler = False
    separate_losses = True
    owns_optimizer_step = True
    checkpoint_format = "deepspeed"

    def _setup(self, config: MDGDConfig, names: Sequence[str], theta_params, models) -> None:
        self.engines = [m for m in models if m is not None]
        self.stage = _stage(self.engines[0])
        self.comm = Collectives(None, config.dist_timeout_s)
        self.world = self.comm.world
        shapes = [global_shape(p) for p in theta_params]
        self.comm.check_agreement(
            fingerprint(
                list(names),
                shapes,
                theta_params[0].dtype,
                theta_params[0].device,
                [int(torch.Size(s).numel()) for s in shapes],
                config.to_dict(),
                f"deepspeed-zero{self.stage}",
            )
        )
        self._ran: list[bool] = []
        self._keep: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ per micro-batch

    def check_micro_batch(self, visual: Any, model: nn.Module, batch: Mapping[str, Any]) -> None:
        """Text-only on every rank or on none: ZeRO-3 gathers weights per module, and on
        both stages the gradient reads are collectives (one tiny all-reduce)."""
        check_same_modality(self.comm, visual, model, batch, self.device, "DeepSpeed ZeRO")

    def point(self, kind: str) -> None:
        """DeepSpeed owns ``.grad``; the gradients are read after each backward."""

    def before_backward(self, kind: str, last: bool) -> None:
        # reduce every backward at once: mdgd accumulates g and h in its own buffers
        for eng in self.engines:
            eng.set_gradient_accumulation_boundary(True)

    def backward(
        self, kind: str, losses: Sequence[torch.Tensor], retain_graph: bool, scale: Any
    ) -> None:
        self._ran = []
        for eng, loss in zip(self.engines, losses):
            ran = loss.requires_grad
            if ran:
                eng.backward(loss, retain_graph=retain_graph, scale_wrt_gas=False)
            self._ran.append(ran)

    def after_backward(self, kind: str, last: bool) -> None:
        ran, self._ran = self._ran, []
        for fg, eng, did in zip(self.sides, self.engines, ran):
            if did:
                self._read(fg.local_views(kind), fg.params)
                for j, p in enumerate(fg.params):  # no stale gradient is read twice
                    self._clear(j, p)
                eng.optimizer.zero_grad()  # else ZeRO-3 adds the next backward to this one

    def collective_error(self, e: BaseException) -> Exception | None:
        if not raised_by_a_collective(e):
            return None
        return RuntimeError(
            f"mdgd (rank {self.comm.rank} of {self.world}): a DeepSpeed collective of the "
            f"forward/backward (ZeRO's gather of the weights or reduction of the gradients) "
            f"did not complete ({e}). DeepSpeed waits for the process group's timeout, not "
            f"MDGDConfig.dist_timeout_s ({self.config.dist_timeout_s:g} s). Another rank failed "
            "or did not reach the same step: check the other ranks' logs"
        )

    # ------------------------------------------------------------------ the step

    def scale(self, n: int) -> float:
        return 1.0 / n  # ZeRO's reduction already averaged over the ranks

    def assign_direction(self, skipped: bool, selected: Sequence[float], scaler: bool) -> None:
        """Write the direction into ZeRO's gradient partitions (zeros where MDGD-GM selects
        nothing); nothing on a skipped step (the partitions were zeroed after the reads)."""
        if skipped:
            return
        views = self.theta.local_views("g")
        for j, (p, d) in enumerate(zip(self.theta.params, views)):
            keep = not selected or selected[j]
            self._write(j, p, d if keep else torch.zeros_like(d))

    def release_grads(self) -> None:
        for eng in self.engines:
            eng.optimizer.zero_grad()

    def freezer(self, engine: Any) -> Any:
        return self if self.config.mode == "gm" else None

    def select(self, mask: torch.Tensor, hits: Sequence[float], skipped: bool) -> None:
        """MDGD-GM's mask of the step: which elements of each parameter stay unchanged."""
        self._keep = {}
        if skipped:
            return
        segs = self.segments
        first, counts = [0] * len(self.theta.params), [0] * len(self.theta.params)
        for s, owner in enumerate(segs.param_index):
            if counts[owner] == 0:
                first[owner] = s
            counts[owner] += 1
        sizes = self.layout.sizes_t
        partial = self.config.freeze_unselected and self.config.block_size is not None
        for j, h in enumerate(hits):
            if h == 0:
                self._keep[j] = None  # nothing selected: restore all of it
            elif partial and h < counts[j]:
                lo, hi = first[j], first[j] + counts[j]
                keep = torch.repeat_interleave(
                    mask[lo:hi], sizes[lo:hi], output_size=self.numels[j]
                )
                self._keep[j] = self._local_part(j, keep)

    def optimizer_step(self, skipped: bool) -> None:
        eng = self.engines[0]
        if skipped:
            if eng.lr_scheduler is not None:
                eng.lr_scheduler.step()
            return
        saved = self._snapshot() if self._keep else None
        eng.step()
        if saved is not None:
            self._restore(saved)
        self._keep = {}
        self._after_step()

    def _after_step(self) -> None:
        """ZeRO-1/2 start every boundary backward from empty partitions (and refuse
        gradient calls after a step)."""

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        raise RuntimeError(
            'under DeepSpeed the engine clips the direction: set "gradient_clipping" in its '
            "config (engine.get_global_grad_norm() reports the norm after a step)"
        )

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, engine: Any, path: Path) -> Path:
        from .deepspeed_checkpoint import save_deepspeed

        return save_deepspeed(engine, self.engines[0], path)

    def load_checkpoint(self, engine: Any, path: Path) -> None:
        from .deepspeed_checkpoint import load_deepspeed

        load_deepspeed(engine, self.engines[0], path)


class ZeRO3Exchange(_DeepSpeedSteps, ShardedExchange):
    """ZeRO-3: buffers of this rank's partitions (``safe_get_local_grad``)."""

    retains_graph = False  # ZeRO-3 releases the gathered weights in the first backward

    def __init__(self, config, names, theta_params, phi_params, models) -> None:
        self._part = [int(p.ds_tensor.numel()) for p in theta_params]  # padded partition
        for name, q, part in zip(names, phi_params or (), self._part):
            if int(q.ds_tensor.numel()) != part:
                raise ValueError(
                    f"{name}: ref_model's ZeRO-3 partition holds {q.ds_tensor.numel()} elements "
                    f"on this rank, model's {part}: build both engines from one config"
                )
        rank, world = dist.get_rank(), dist.get_world_size()
        numels = [int(p.ds_numel) for p in theta_params]
        self._ranges = [
            (min(rank * part, n), min((rank + 1) * part, n)) for part, n in zip(self._part, numels)
        ]
        self._setup(config, names, theta_params, models)
        super().__init__(config, names, theta_params, phi_params)
        self.world = world
        self.set_local_ranges(self._ranges)
        self._zeros = torch.zeros(max(self._part), dtype=torch.float32, device=self.device)

    def local_shapes(self, params: Sequence[nn.Parameter]) -> list[torch.Size]:
        return [torch.Size([hi - lo]) for lo, hi in self._ranges]

    def _read(self, views: Sequence[torch.Tensor], params: Sequence[nn.Parameter]) -> None:
        from deepspeed.utils import safe_get_local_grad

        for v, p in zip(views, params):
            v.add_(safe_get_local_grad(p)[: v.numel()])  # the partition may end in padding

    def _after_step(self) -> None:
        """The direction stays in ZeRO-3's partitions after the step: a parameter that
        the next backward does not reach (text-only) would be read with it."""
        for j, p in enumerate(self.theta.params):
            self._clear(j, p)
        self.engines[0].optimizer.zero_grad()

    def _clear(self, j: int, p: nn.Parameter) -> None:
        from deepspeed.utils import safe_set_local_grad

        safe_set_local_grad(p, self._zeros[: self._part[j]])

    def _write(self, j: int, p: nn.Parameter, d: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_local_grad

        full = torch.zeros(self._part[j], dtype=torch.float32, device=d.device)
        full[: d.numel()] = d
        safe_set_local_grad(p, full)

    def _local_part(self, j: int, keep: torch.Tensor) -> torch.Tensor:
        lo, hi = self._ranges[j]
        return keep[lo:hi]

    def _snapshot(self) -> dict[int, tuple]:
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        keys = _state_keys(self.engines[0])
        out = {}
        for j in self._keep:
            p = self.theta.params[j]
            states = {k: safe_get_local_optimizer_state(p, k).clone() for k in keys}
            out[j] = (safe_get_local_fp32_param(p).clone(), p.ds_tensor.detach().clone(), states)
        return out

    @torch.no_grad()
    def _restore(self, saved: dict[int, tuple]) -> None:
        from deepspeed.utils import (
            safe_get_local_fp32_param,
            safe_get_local_optimizer_state,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        for j, (master, low, states) in saved.items():
            p, keep = self.theta.params[j], self._keep[j]
            n = self._ranges[j][1] - self._ranges[j][0]
            safe_set_local_fp32_param(p, _merge(safe_get_local_fp32_param(p), master, keep, n))
            # the model's own partition was already copied from the stepped master
            p.ds_tensor.copy_(_merge(p.ds_tensor, low, keep, n))
            for k, old in states.items():
                now = safe_get_local_optimizer_state(p, k)
                safe_set_local_optimizer_state(p, _merge(now, old, keep, n), k)


class ZeRO12Exchange(_DeepSpeedSteps, GradExchange):
    """ZeRO-1/2: full buffers on every rank (``safe_get_full_grad``, averaged)."""

    def __init__(self, config, names, theta_params, phi_params, models) -> None:
        self._setup(config, names, theta_params, models)
        super().__init__(config, names, theta_params, phi_params)
        self.world = self.comm.world
        most = max(p.numel() for p in theta_params)
        self._zeros = torch.zeros(most, dtype=torch.float32, device=self.device)

    def reduce(self, loss_sums: torch.Tensor, n: int) -> torch.Tensor:
        small = super().reduce(loss_sums, n)
        return self.comm.all_reduce(small, "all-reduce of the losses")

    def _read(self, views: Sequence[torch.Tensor], params: Sequence[nn.Parameter]) -> None:
        from deepspeed.utils import safe_get_full_grad

        for v, p in zip(views, params):  # a collective per parameter, same order everywhere
            v.add_(safe_get_full_grad(p).view_as(v))

    def _clear(self, j: int, p: nn.Parameter) -> None:
        from deepspeed.utils import safe_set_full_grad  # local: this rank's fragment

        safe_set_full_grad(p, self._zeros[: p.numel()].view(p.shape))

    def _write(self, j: int, p: nn.Parameter, d: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_grad

        safe_set_full_grad(p, d.float())

    def _local_part(self, j: int, keep: torch.Tensor) -> torch.Tensor:
        return keep

    def _snapshot(self) -> dict[int, tuple]:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        keys = _state_keys(self.engines[0])
        out = {}
        for j in self._keep:
            p = self.theta.params[j]
            states = {k: safe_get_full_optimizer_state(p, k).clone() for k in keys}
            out[j] = (safe_get_full_fp32_param(p).clone(), p.detach().clone(), states)
        return out

    @torch.no_grad()
    def _restore(self, saved: dict[int, tuple]) -> None:
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        for j, (master, low, states) in saved.items():
            p, keep = self.theta.params[j], self._keep[j]
            n = p.numel()
            safe_set_full_fp32_param(p, _merge(safe_get_full_fp32_param(p), master, keep, n))
            p.copy_(_merge(p.detach(), low, keep, n))
            for k, old in states.items():
                now = safe_get_full_optimizer_state(p, k)
                safe_set_full_optimizer_state(p, _merge(now, old, keep, n), k)


def _merge(now: torch.Tensor, old: torch.Tensor, keep: torch.Tensor | None, n: int) -> torch.Tensor:
    """``now`` where ``keep`` (the first ``n`` flat elements), ``old`` elsewhere."""
    if keep is None:
        return old.clone()
    out = now.detach().clone()
    flat, prev = out.view(-1)[:n], old.view(-1)[:n]
    flat.copy_(torch.where(keep.view(-1), flat, prev))
    return out


def _state_keys(engine: Any) -> list[str]:
    """The optimizer's per-element state (AdamW's moments, SGD's momentum): the keys of
    the torch optimizer inside ZeRO's whose tensors have more than one element."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    keys: set[str] = set()
    for st in inner.state.values():
        keys |= {k for k, v in st.items() if isinstance(v, torch.Tensor) and v.numel() > 1}
    return sorted(keys)


__all__ = [
    "DeepSpeedExchange",
    "MIN_VERSION",
    "ZeRO12Exchange",
    "ZeRO3Exchange",
    "config_unsupported",
    "deepspeed_models",
    "reference_engine",
    "reference_config",
]
