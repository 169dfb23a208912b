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
  every rank steps the same averaged direction. ``"sharded"`` is not supported
  inside the Trainer (its optimizer steps the full parameters); see
  ``docs/distributed.md``.
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

from ..config import MDGDConfig, mark_trainable
from ..engine import FIGURES, MDGDEngine
from ..visual import VisualHook

CONFIG_NAME = "mdgd_config.json"
TRAINABLE_NAME = "mdgd_trainable.safetensors"


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
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise NotImplementedError(
                "MDGDTrainer does not support DeepSpeed or FSDP yet: they keep the gradients in "
                "their own (sharded) buffers, which MDGD's two backward calls and flat buffers "
                "bypass. Launch with torchrun/accelerate without them: the engine runs in "
                "data-parallel mode (docs/distributed.md)"
            )
        if ref_model is not None and self.mdgd_config.mode != "ft":
            ref_model.to(self.args.device)
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 only
        self.engine = MDGDEngine(
            self.model, ref_model, None, self.mdgd_config, visual=visual, scaler=scaler
        )
        if self.engine.dist_mode != "none":
            self._keep_model_unwrapped()
        self._mdgd_logs: list[dict[str, float]] = []

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
            trainable = {
                n: p.detach().cpu().contiguous()
                for n, p in zip(self.engine.param_names, self.engine.theta.params)
            }
            save_file(trainable, os.path.join(output_dir, TRAINABLE_NAME))
