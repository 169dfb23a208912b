"""How :class:`mdgd.integrations.hf.MDGDTrainer` works under each launch setup.

The Trainer subclass names no strategy: it asks :func:`prepare_models` before
``Trainer.__init__`` and :func:`trainer_strategy` after it, then calls the
returned object's methods. One class per setup:

* :class:`PlainStrategy`: one process, or several under ``torchrun`` /
  ``accelerate launch`` (``"dp"``): the engine owns the collectives, so
  accelerate places and autocasts the model but does not wrap it in DDP;
* :class:`FSDPStrategy`: ``MDGDConfig(distributed="fsdp")`` shards both models
  with :func:`mdgd.shard_models` before the Trainer is built; the trainable
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
    for (accelerate must not wrap them)."""
    if config.distributed == "fsdp" and not is_fsdp(model):
        device = args.device  # sets up the process group, as the Trainer would
        shard_models(model.to(device), ref_model.to(device) if ref_model else None)


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
