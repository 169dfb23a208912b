"""How :class:`mdgd.integrations.hf.MDGDTrainer` works under each launch setup.

The Trainer subclass names no strategy: it asks :func:`prepare_models` before
``Trainer.__init__`` and :func:`trainer_strategy` after it, then calls the
returned object's methods. One class per setup:

* :class:`PlainStrategy`: one process, or several under ``torchrun`` /
  ``accelerate launch`` (``"dp"``): the engine owns the collectives, so
  accelerate places and autocasts the model but does not wrap it in DDP;
* :class:`FSDPStrategy`: ``MDGDConfig(distributed="fsdp")`` shards both models
  with :func:`mdgd.shard_models` before the Trainer is built (``mdgd train --fsdp``
  takes this path: :func:`launch_mode`); the trainable
  parameters and the optimizer state are checkpointed through
  ``torch.distributed.checkpoint`` (``mdgd_fsdp/``), ``save_model`` gathers the
  full state dict;
* :class:`FSDPPluginStrategy`: accelerate's FSDP plugin (``fsdp_version: 2``)
  wraps theta in ``prepare``; the engine is built at the first training step,
  with phi wrapped the way theta was (:func:`mdgd.distributed.shard.shard_like`);
* :class:`DeepSpeedStrategy`: ``TrainingArguments(deepspeed=...)``: accelerate
  builds theta's DeepSpeed engine in ``prepare``; at the first training step
  phi gets an engine of the same (resolved) config
  (:func:`mdgd.distributed.deepspeed.reference_engine`), and after each
  optimizer step's direction the strategy steps theta's engine (accelerate's
  ``backward`` would step it after every backward). The Trainer's own
  DeepSpeed checkpointing saves and resumes the engine.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..config import MDGDConfig
from .common import is_fsdp
from .deepspeed import config_unsupported, reference_engine
from .shard import shard_like, shard_models

SHARDED_DIR = "mdgd_fsdp"
SCHEDULER_NAME = "scheduler.pt"


def prepare_models(
    config: MDGDConfig, model: nn.Module, ref_model: nn.Module | None, args: Any
) -> None:
    """Before ``Trainer.__init__``: shard both models when MDGD's own FSDP2 path is asked
    for (accelerate must not wrap them), with the options :func:`launch_mode` took from
    ``--fsdp`` / ``--fsdp_config``, if any."""
    if config.distributed == "fsdp" and not is_fsdp(model):
        device = args.device  # sets up the process group, as the Trainer would
        options = getattr(args, SHARD_OPTIONS, None) or {}
        shard_models(model.to(device), ref_model.to(device) if ref_model else None, **options)


def prepare_launch(args: Any) -> None:
    """Before any model is loaded: set up the process group as the Trainer will (touching
    ``args.device`` does), and under DeepSpeed its communication layer too, since
    transformers then loads ZeRO-3 models partitioned (``zero.Init``), which needs the
    ranks (on CPU, with ``use_cpu``, accelerate leaves that layer uninitialised)."""
    _ = args.device
    if getattr(args, "deepspeed", None):
        import torch.distributed as dist

        from .deepspeed import check_version

        if dist.is_available() and dist.is_initialized():
            check_version().init_distributed(dist_backend=dist.get_backend())


SHARD_OPTIONS = "mdgd_shard_options"
"""The ``TrainingArguments`` attribute where :func:`launch_mode` leaves the
:func:`shard_models` options that :func:`prepare_models` passes on."""

# fsdp_config keys (TrainingArguments strips their "fsdp_" prefix) refused when on: MDGD's
# own path would otherwise ignore them and run something else than asked for
FSDP_REFUSED = {
    "cpu_offload": "CPU offloading (also --fsdp offload) is not supported: the engine's four "
    "gradient buffers live on the device",
    "cpu_ram_efficient_loading": "not supported: both models are loaded whole on every rank, "
    "then sharded",
    "activation_checkpointing": "not supported; pass --gradient_checkpointing instead "
    "(transformers' activation checkpointing works with MDGD's two backward passes)",
    "xla": "XLA FSDP is not supported",
    "xla_fsdp_v2": "XLA FSDP is not supported",
    "xla_fsdp_grad_ckpt": "XLA FSDP is not supported",
    "xla_fsdp_settings": "XLA FSDP is not supported",
}
# the keys read: the version (2 only) and the one mapped to a shard_models option
FSDP_TAKEN = ("version", "reshard_after_forward")
# values that are what MDGD's own path does anyway (TrainingArguments fills in
# min_num_params); other values, and every other key, are ignored with a warning: the path
# wraps each vision-encoder and decoder layer of both models, then each root
# (shard_models), and saves the final model as a full state dict
FSDP_AS_DONE = {
    "min_num_params": 0,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "state_dict_type": "FULL_STATE_DICT",
}


def launch_mode(args: Any) -> str:
    """``MDGDConfig.distributed`` for ``mdgd train``'s flags: ``"fsdp"`` when they ask for
    FSDP (``--fsdp``, e.g. ``--fsdp full_shard --fsdp_config '{"fsdp_version": 2}'``; FSDP2
    is transformers' default), else ``"auto"``. Call it after :func:`prepare_launch`, before
    the Trainer is built.

    ``--fsdp`` takes MDGD's own FSDP2 path: :func:`prepare_models` shards both models with
    :func:`shard_models` (``reshard_after_forward`` from the config: ``--fsdp shard_grad_op``
    or ``"reshard_after_forward": false`` keep the gathered weights until the backward), and
    the ``TrainingArguments``' FSDP fields (``fsdp``, ``fsdp_config``, ``fsdp_plugin_args``,
    the latter read only when the Trainer builds its accelerator) are cleared, so that
    accelerate builds no FSDP plugin and does not wrap the model. Raises ``ValueError``
    naming the flag for what the path does not do: FSDP1, ``--deepspeed`` too, an
    ``accelerate launch`` FSDP config too, a single process, the keys of
    :data:`FSDP_REFUSED`; warns about the keys it ignores (:data:`FSDP_AS_DONE`).
    """
    import torch.distributed as dist

    if not getattr(args, "fsdp", None):
        return "auto"
    config = dict(args.fsdp_config or {})
    if getattr(args, "deepspeed", None):
        raise ValueError("--fsdp and --deepspeed cannot be combined: pass one of them")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise ValueError(
            "--fsdp under an accelerate launch with an FSDP config: drop --fsdp (accelerate's "
            "FSDP2 plugin then wraps the model) or launch without accelerate's FSDP config"
        )
    for key, why in FSDP_REFUSED.items():
        if _on(config.get(key)):
            raise ValueError(f"--fsdp_config {key}: {why}")
    version = int(config.get("version", 2))
    if version != 2:
        raise ValueError(
            f"--fsdp_config fsdp_version {version}: only FSDP2 is supported (FSDP1 keeps the "
            "gradients in flat buffers of its own); pass --fsdp_config '{\"fsdp_version\": 2}'"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "--fsdp needs several processes: launch with torchrun --nproc-per-node N -m mdgd "
            "train ... (or accelerate launch without an FSDP config)"
        )
    missing = object()
    ignored = sorted(
        k
        for k, v in config.items()
        if k not in FSDP_REFUSED and k not in FSDP_TAKEN and FSDP_AS_DONE.get(k, missing) != v
    )
    if ignored:
        warnings.warn(
            f"--fsdp_config {', '.join(ignored)} ignored: MDGD's FSDP2 path wraps each "
            "vision-encoder and decoder layer of both models, then each model, and saves the "
            "final model as a full state dict",
            stacklevel=2,
        )
    reshard = _on(config.get("reshard_after_forward", True))  # transformers' FSDP2 default
    setattr(args, SHARD_OPTIONS, {"reshard_after_forward": reshard})
    args.fsdp = args.fsdp_config = args.fsdp_plugin_args = None
    return "fsdp"


def _on(value: Any) -> bool:
    """A flag's truth as ``TrainingArguments`` reads it (the string "false" is off)."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "t", "on")
    return bool(value)


def rank_bytes(trainer: Any) -> dict[str, Any] | None:
    """Every rank's bytes of both models' parameters, the engine's gradient buffers and the
    optimizer state (:func:`mdgd.buffers.held_bytes`), gathered: ``{"mode": "fsdp",
    "per_rank": [rank 0's, rank 1's, ...]}`` on every rank, which must all call it. None
    before the engine is built and under DeepSpeed (ZeRO's partitions are not the models'
    tensors)."""
    import torch.distributed as dist

    from ..buffers import held_bytes

    engine = trainer.engine
    if engine is None or trainer.is_deepspeed_enabled:
        return None
    optimizer = inner_optimizer(trainer.optimizer) if trainer.optimizer is not None else None
    held = held_bytes(engine, optimizer)
    per_rank: list[Any] = [held]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, held)
    return {"mode": engine.distributed, "per_rank": per_rank}


@contextlib.contextmanager
def whole_model_loading(args: Any) -> Iterator[None]:
    """Load models whole in this block, also under a ZeRO-3 config.

    ``TrainingArguments(deepspeed=<ZeRO-3>)`` makes transformers' ``from_pretrained``
    partition each model as it loads (``deepspeed.zero.Init``). phi is theta's deep copy
    (one read from disk), and partitioned parameters cannot be copied; a second
    partitioned load of the same class failed in transformers 5.25 (its hub-kernel
    attention forward lost its per-instance state). So both are loaded whole on every
    rank (host memory: twice the model per rank, briefly) and DeepSpeed partitions them
    when it builds the engines. transformers' switch for this is the weak reference to
    the config that ``TrainingArguments`` registers: unset here, set back after.
    """
    from transformers.integrations.deepspeed import (
        is_deepspeed_zero3_enabled,
        set_hf_deepspeed_config,
        unset_hf_deepspeed_config,
    )

    config = getattr(args, "hf_deepspeed_config", None)
    if config is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


def trainer_strategy(trainer: Any) -> TrainerStrategy:
    """The strategy for a Trainer whose ``__init__`` has run (raises where none fits)."""
    if trainer.is_deepspeed_enabled:
        return DeepSpeedStrategy(trainer)
    if trainer.is_fsdp_enabled:
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        if getattr(plugin, "fsdp_version", 1) != 2:
            raise NotImplementedError(
                "MDGDTrainer supports accelerate's FSDP plugin with fsdp_version: 2 only (FSDP1 "
                "keeps the gradients in flat buffers of its own)"
            )
        return FSDPPluginStrategy(trainer)
    if is_fsdp(trainer.model):
        return FSDPStrategy(trainer)
    return PlainStrategy(trainer)


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


class TrainerStrategy:
    """The default: the Trainer's own optimizer step, clipping and checkpoints."""

    build_at_init = True
    """Build the engine in ``__init__``; False: at the first training step, once
    accelerate's ``prepare`` has wrapped theta."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def engine_models(self, ref_model: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
        """The two models the engine gets (wrapped as the strategy needs)."""
        return self.trainer.model, ref_model

    def engine_built(self, engine: Any) -> None:
        """Called once the engine exists: under several ranks, keep accelerate's
        ``prepare`` (still to come when the engine is built in ``__init__``) from
        wrapping the model in DDP."""
        if self.build_at_init and engine.exchange.world > 1:
            self._keep_model_unwrapped()

    def _keep_model_unwrapped(self) -> None:
        """Have accelerate place and autocast the model but not wrap it in DDP.

        The engine reduces the four gradient buffers itself; a DDP wrapper would
        register its own hooks and allocate a second copy of the gradients.
        ``prepare_model(evaluation_mode=True)`` skips exactly the wrapping.
        """
        accelerator = self.trainer.accelerator
        prepare_model = accelerator.prepare_model
        model = self.trainer.model

        def prepare_unwrapped(m, device_placement=None, evaluation_mode=False):
            if m is model:
                evaluation_mode = True
            return prepare_model(
                m, device_placement=device_placement, evaluation_mode=evaluation_mode
            )

        accelerator.prepare_model = prepare_unwrapped

    def attach_freeze(self, engine: Any, optimizer: Any) -> None:
        if engine.freeze is not None and optimizer is not None:
            engine.freeze.attach(inner_optimizer(optimizer))  # MDGD-GM "block:K"

    def after_direction(self, engine: Any, figures: dict[str, float]) -> None:
        """After the step's direction is in theta's gradients (the Trainer then steps)."""

    # checkpoints: each returns True when it did the work, False for the Trainer's own

    def save_model(self, output_dir: str | None) -> bool:
        return False

    def save_optimizer_and_scheduler(self, output_dir: str) -> bool:
        return False

    def load_optimizer_and_scheduler(self, checkpoint: str) -> bool:
        return False

    def loads_parameters_with_optimizer(self) -> bool:
        """True where resuming restores the trainable parameters with the optimizer state
        (the Trainer's ``_load_from_checkpoint`` must then do nothing)."""
        return False


class PlainStrategy(TrainerStrategy):
    """One process, or ``"dp"`` under a multi-rank launch (module doc)."""


class FSDPStrategy(TrainerStrategy):
    """MDGD's own FSDP2 path (module doc)."""

    def save_model(self, output_dir: str | None) -> bool:
        """Every rank gathers the full state dict and rank 0 writes it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        t = self.trainer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(t.model, options=options)
        if t.args.should_save:
            t._save(output_dir if output_dir is not None else t.args.output_dir, state_dict)
        return True

    def save_optimizer_and_scheduler(self, output_dir: str) -> bool:
        from .fsdp_checkpoint import save_sharded

        t = self.trainer
        save_sharded(t.model, inner_optimizer(t.optimizer), os.path.join(output_dir, SHARDED_DIR))
        if t.args.should_save:
            torch.save(t.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
        return True

    def load_optimizer_and_scheduler(self, checkpoint: str) -> bool:
        from .fsdp_checkpoint import load_sharded

        t = self.trainer
        load_sharded(t.model, inner_optimizer(t.optimizer), os.path.join(checkpoint, SHARDED_DIR))
        state = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        t.lr_scheduler.load_state_dict(state)
        return True

    def loads_parameters_with_optimizer(self) -> bool:
        return True


class FSDPPluginStrategy(FSDPStrategy):
    """accelerate's FSDP2 plugin (module doc); the Trainer saves the model itself."""

    build_at_init = False

    def engine_models(self, ref_model: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
        model = self.trainer.model
        if ref_model is not None and is_fsdp(model) and not is_fsdp(ref_model):
            shard_like(ref_model, model)  # accelerate's plugin wrapped theta only
        return model, ref_model

    def save_model(self, output_dir: str | None) -> bool:
        return False


class DeepSpeedStrategy(TrainerStrategy):
    """``TrainingArguments(deepspeed=...)`` (module doc)."""

    build_at_init = False

    def __init__(self, trainer: Any) -> None:
        super().__init__(trainer)
        config = trainer.args.hf_deepspeed_config.config  # "auto" filled from the arguments
        why = config_unsupported(config, trainer.args.fp16)
        if why is not None:  # at construction; the engine itself checks again when built
            raise ValueError(f"MDGDTrainer cannot run on this DeepSpeed config: {why}")

    def engine_models(self, ref_model: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
        t = self.trainer
        engine = t.model_wrapped  # accelerate's prepare built it
        if ref_model is None:
            return engine, None
        config = t.accelerator.state.deepspeed_plugin.deepspeed_config  # "auto" filled in
        return engine, reference_engine(ref_model, engine, config)

    def attach_freeze(self, engine: Any, optimizer: Any) -> None:
        """The exchange keeps MDGD-GM's unselected parameters around the engine's step."""

    def after_direction(self, engine: Any, figures: dict[str, float]) -> None:
        engine.exchange.optimizer_step(bool(figures["skipped"]))
