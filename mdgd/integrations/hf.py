"""MDGDTrainer: MDGD inside ``transformers.Trainer`` (transformers 5).

    from mdgd.integrations.hf import MDGDTrainer

    trainer = MDGDTrainer(model=model, ref_model=ref_model, args=args,
                          train_dataset=ds, mdgd_config=MDGDConfig(mode="mdgd", trainable=...))
    trainer.train()

How it fits the Trainer's loop: the Trainer calls ``training_step`` once per
micro-batch and then clips and steps the optimizer. ``training_step`` here runs
:meth:`MDGDEngine.backward` (the two models' forwards and the two backward calls
into the flat buffers); on the last micro-batch of an optimizer step
(``accelerator.sync_gradients``) it runs the fused op once, which leaves the MDGD
direction in theta's ``.grad``, so the Trainer's clipping, optimizer, scheduler
and checkpointing see the direction as if it were the gradient.

* Clipping: ``MDGDConfig.max_grad_norm``, when set, replaces
  ``TrainingArguments.max_grad_norm``; the Trainer clips the direction (in
  ``"dp"`` mode every rank holds the same averaged direction, so the norm is
  the global one).
* A LLaVA data mix works as is: text-only micro-batches (``L_v = 0``) and
  micro-batches whose labels are all -100 (``L_vl = 0``) train; a step with no
  supervised token at all is a non-finite step (``MDGDConfig.nonfinite``).
* MDGD-GM with ``"block:K"``: the optimizer the Trainer builds (or is given) is
  hooked so that unselected blocks stay unchanged (``freeze_unselected``).
* Gradient accumulation: micro-batches are weighted equally (each one's losses
  are per-micro-batch means); ``num_items_in_batch`` token weighting is not used.
* Mixed precision: accelerate autocasts only the prepared model, so the
  reference model runs inside ``accelerator.autocast()`` too. With fp16 the
  accelerator's GradScaler scales all four gradients alike.
* Logs: every figure of :data:`mdgd.FIGURES` goes to the Trainer's logs as
  ``mdgd/<name>`` (the mean over the optimizer steps since the last log;
  ``mdgd/skipped`` is their count).
* Checkpoints: the Trainer's own (model, optimizer, scheduler, RNG, state), plus
  ``mdgd_config.json`` and ``mdgd_trainable.safetensors`` (the trainable
  parameters under the model's own names), which resuming reads. Why:
  transformers 5.23's ``Trainer._load_from_checkpoint`` calls
  ``load_state_dict(strict=False)`` with the key names ``save_pretrained`` wrote
  (the legacy ones, for LLaVA), which match none of the model's: the stock
  Trainer resumes LLaVA from the *initial* weights with only a warning. The frozen
  parameters never change, so the rebuilt model already has them. ``ref_model``
  is not saved either: build it again from the pre-trained weights to resume.
* Several processes (``torchrun`` / ``accelerate launch``): the engine runs in
  ``"dp"`` mode (``MDGDConfig.distributed="auto"``) and owns the collectives; the
  model is not wrapped in DDP (accelerate's ``prepare_model`` is asked not to),
  every rank steps the same averaged direction.
* FSDP2, own entry point: ``MDGDConfig(distributed="fsdp")`` shards both models
  with :func:`mdgd.shard_models` when the Trainer is built (accelerate does not
  wrap them); the Trainer's optimizer, clipping and scheduler act on theta's
  ``DTensor`` parameters. Checkpoints: ``save_model`` gathers the full state
  dict (every rank takes part, rank 0 writes it); the trainable parameters and
  the optimizer state go through ``torch.distributed.checkpoint`` into
  ``mdgd_fsdp/`` of the checkpoint, which resuming reads.
* FSDP2 through accelerate's plugin (``fsdp_version: 2``): accelerate wraps theta
  in ``prepare``; the engine is then built at the first training step and phi is
  wrapped the way theta was (:func:`mdgd.distributed.shard.shard_like`).
  DeepSpeed is refused. See ``docs/distributed.md``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer

from ..checkpoint import load_sharded, save_sharded
from ..config import MDGDConfig, mark_trainable
from ..distributed import is_fsdp, shard_like, shard_models
from ..engine import FIGURES, MDGDEngine
from ..visual import VisualHook

CONFIG_NAME = "mdgd_config.json"
TRAINABLE_NAME = "mdgd_trainable.safetensors"
SHARDED_DIR = "mdgd_fsdp"
SCHEDULER_NAME = "scheduler.pt"


class MDGDTrainer(Trainer):
    """A ``transformers.Trainer`` that trains ``model`` with MDGD against ``ref_model``.

    Args:
        ref_model: the frozen pre-trained model (same architecture as ``model``,
            separate parameters); moved to the Trainer's device. Ignored for
            ``mode="ft"``.
        mdgd_config: the :class:`MDGDConfig`; its ``trainable`` patterns (if any)
            are applied to both models before the optimizer is built.
        visual: the visual-representation hook (default: image-token hidden states).
        Every other argument is the Trainer's.
    """

    def __init__(
        self,
        *args: Any,
        ref_model: nn.Module | None = None,
        mdgd_config: MDGDConfig | None = None,
        visual: VisualHook | None = None,
        **kwargs: Any,
    ) -> None:
        self.mdgd_config = mdgd_config if mdgd_config is not None else MDGDConfig()
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("MDGDTrainer needs model")
        if self.mdgd_config.trainable is not None:
            mark_trainable(model, self.mdgd_config.trainable)  # before the optimizer is built
        if self.mdgd_config.mode == "ft":
            ref_model = None
        if self.mdgd_config.distributed == "fsdp" and not is_fsdp(model):
            training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
            device = training_args.device  # sets up the process group, as the Trainer would
            shard_models(model.to(device), ref_model.to(device) if ref_model else None)
        super().__init__(*args, **kwargs)
        if self.mdgd_config.max_grad_norm is not None:  # the Trainer clips the direction
            self.args.max_grad_norm = self.mdgd_config.max_grad_norm
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "MDGDTrainer does not support DeepSpeed: ZeRO keeps the gradients in its own "
                "partitioned buffers, which MDGD's two backward calls bypass. Shard with FSDP2 "
                "instead: MDGDConfig(distributed='fsdp'), or accelerate's FSDP plugin with "
                "fsdp_version: 2 (docs/distributed.md)"
            )
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) != 2:
            raise NotImplementedError(
                "MDGDTrainer supports accelerate's FSDP plugin with fsdp_version: 2 only (FSDP1 "
                "keeps the gradients in flat buffers of its own)"
            )
        if ref_model is not None:
            ref_model.to(self.args.device)
        self._ref_model, self._visual = ref_model, visual
        self.engine: MDGDEngine | None = None
        if not self.is_fsdp_enabled:  # accelerate's FSDP2 wraps theta in prepare(): wait
            self.engine = self._build_engine()
            if self.engine.dist_mode != "none":
                self._keep_model_unwrapped()
        self._mdgd_logs: list[dict[str, float]] = []

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.engine is not None:  # else _build_engine attaches it
            self._attach_freeze(optimizer)
        return optimizer

    def _attach_freeze(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.engine.freeze is not None and optimizer is not None:
            self.engine.freeze.attach(_inner(optimizer))  # MDGD-GM "block:K": keep unselected

    def _build_engine(self) -> MDGDEngine:
        ref_model = self._ref_model
        if ref_model is not None and is_fsdp(self.model) and not is_fsdp(ref_model):
            shard_like(ref_model, self.model)  # accelerate's plugin wrapped theta only
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 only
        return MDGDEngine(
            self.model, ref_model, None, self.mdgd_config, visual=self._visual, scaler=scaler
        )

    @property
    def _sharded(self) -> bool:
        return is_fsdp(self.model)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        if self.engine is None:
            self.engine = self._build_engine()
            self._attach_freeze(self.optimizer)
        last = self.accelerator.sync_gradients
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            loss = self.engine.backward(inputs, last=last)
        if last:
            self._mdgd_logs.append(self.engine.compute_direction())
        return loss / self.current_gradient_accumulation_steps

    def _keep_model_unwrapped(self) -> None:
        """Have accelerate place and autocast the model but not wrap it in DDP.

        The engine reduces the four gradient buffers itself; a DDP wrapper would
        register its own hooks and allocate a second copy of the gradients.
        ``prepare_model(evaluation_mode=True)`` skips exactly the wrapping.
        """
        accelerator = self.accelerator
        prepare_model = accelerator.prepare_model
        model = self.model

        def prepare_unwrapped(m, device_placement=None, evaluation_mode=False):
            if m is model:
                evaluation_mode = True
            return prepare_model(
                m, device_placement=device_placement, evaluation_mode=evaluation_mode
            )

        accelerator.prepare_model = prepare_unwrapped

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._mdgd_logs and "loss" in logs:
            for key in FIGURES:
                vals = [f[key] for f in self._mdgd_logs]
                if key == "skipped":
                    logs["mdgd/skipped"] = float(sum(vals))
                else:
                    finite = [v for v in vals if not math.isnan(v)]
                    logs[f"mdgd/{key}"] = sum(finite) / len(finite) if finite else math.nan
            self._mdgd_logs.clear()
        super().log(logs, start_time)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        if self._sharded:  # sharded parameters: loaded with the optimizer (mdgd_fsdp/)
            return None
        path = os.path.join(resume_from_checkpoint, TRAINABLE_NAME)
        if not os.path.isfile(path):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # MDGD changes only the trainable parameters, saved under the model's own names
        tensors = load_file(path)
        engine = self.engine
        missing = sorted(set(engine.param_names) - set(tensors))
        if missing:
            raise ValueError(
                f"{path} lacks {len(missing)} trainable parameter(s) (e.g. {missing[0]}): "
                "resume with the trainable patterns it was saved with"
            )
        with torch.no_grad():
            for name, p in zip(engine.param_names, engine.theta.params):
                p.copy_(tensors[name])

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            with open(os.path.join(output_dir, CONFIG_NAME), "w") as f:
                json.dump(self.mdgd_config.to_dict(), f, indent=2)
            params = dict(self.model.named_parameters()) if state_dict is None else state_dict
            trainable = {n: params[n].detach().cpu().contiguous() for n in self._trainable_names()}
            save_file(trainable, os.path.join(output_dir, TRAINABLE_NAME))

    def _trainable_names(self) -> list[str]:
        if self.engine is not None:
            return self.engine.param_names
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ FSDP2 checkpoints

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2 every rank gathers the full state dict and rank 0 writes it."""
        if not self._sharded or self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state_dict = get_model_state_dict(self.model, options=options)
        if self.args.should_save:
            self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._sharded:
            return super()._save_optimizer_and_scheduler(output_dir)
        save_sharded(self.model, _inner(self.optimizer), os.path.join(output_dir, SHARDED_DIR))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._sharded:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_sharded(self.model, _inner(self.optimizer), os.path.join(checkpoint, SHARDED_DIR))
        state = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(state)


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)
