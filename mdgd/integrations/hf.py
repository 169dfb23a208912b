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
* DeepSpeed ZeRO-1/2/3 (``TrainingArguments(deepspeed=...)``, e.g. LLaVA's own
  ``zero3.json``): accelerate builds theta's engine in ``prepare``; phi gets an
  engine of the same config at the first training step, and the Trainer steps
  theta's engine once per optimizer step, after the direction is written into
  ZeRO's partitions. DeepSpeed clips (its ``gradient_clipping``) and saves and
  resumes the engine in the Trainer's checkpoints.
* Modality grouping: under FSDP2 and DeepSpeed the ranks' micro-batches of one
  micro-step must all have images or all be text-only. With
  ``group_by_modality_length`` the Trainer samples with
  :class:`mdgd.data.sampler.ModalityLengthGroupedSampler` (LLaVA's
  ``--group_by_modality_length``), which needs the train dataset's
  ``modality_lengths`` (a sample's length, negated when it is text-only) and makes
  every micro-step's batches of all ranks agree on having images (repeating fewer
  than ``ranks * batch size`` samples per modality and epoch to do so) and every
  optimizer step single-modality but the last one or two. The default (None) turns it
  on under FSDP2 and DeepSpeed when the dataset has ``modality_lengths``; False
  keeps the Trainer's own sampler. Resuming mid-epoch keeps the epoch's order
  (:meth:`MDGDTrainer.get_resumed_dataloader`).
* Checkpoints also hold ``mdgd_state.json``: the engine's step count and the
  figures not yet logged, which resuming restores.

Each setup is a strategy of :mod:`mdgd.distributed.trainer`; this class calls
it and names none. See ``docs/distributed.md``.
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
from ..data.sampler import ModalityLengthGroupedSampler
from ..data.tokens import SKIPPED
from ..distributed.common import is_fsdp
from ..distributed.trainer import prepare_models, trainer_strategy
from ..engine import FIGURES, MDGDEngine
from ..reference import unshare
from ..visual import VisualHook

CONFIG_NAME = "mdgd_config.json"
TRAINABLE_NAME = "mdgd_trainable.safetensors"
STATE_NAME = "mdgd_state.json"


def grouped_sampler(loader: Any) -> ModalityLengthGroupedSampler | None:
    """The :class:`ModalityLengthGroupedSampler` under ``loader``'s (nested) batch
    samplers, or None."""
    batches = getattr(loader, "batch_sampler", None)
    while batches is not None:
        sampler = getattr(batches, "sampler", None)
        if isinstance(sampler, ModalityLengthGroupedSampler):
            return sampler
        batches = getattr(batches, "batch_sampler", None)
    return None


class MDGDTrainer(Trainer):
    """A ``transformers.Trainer`` that trains ``model`` with MDGD against ``ref_model``.

    Args:
        ref_model: the frozen pre-trained model (same architecture as ``model``),
            built before training: :func:`mdgd.reference_model` (shares ``model``'s
            frozen modules; under DeepSpeed and accelerate's FSDP2 plugin, which wrap
            ``model`` alone, it is given its own copies of them here) or
            ``copy.deepcopy(model)``; moved to the Trainer's device. Ignored for
            ``mode="ft"``.
        mdgd_config: the :class:`MDGDConfig`; its ``trainable`` patterns (if any)
            are applied to both models before the optimizer is built.
        visual: the visual-representation hook (default: image-token hidden states).
        group_by_modality_length: sample with
            :class:`~mdgd.data.sampler.ModalityLengthGroupedSampler` (the train
            dataset must have ``modality_lengths``); None: do so when the models are
            sharded (FSDP2, DeepSpeed) and the dataset has ``modality_lengths``.
        Every other argument is the Trainer's.
    """

    def __init__(
        self,
        *args: Any,
        ref_model: nn.Module | None = None,
        mdgd_config: MDGDConfig | None = None,
        visual: VisualHook | None = None,
        group_by_modality_length: bool | None = None,
        **kwargs: Any,
    ) -> None:
        self.group_by_modality_length = group_by_modality_length
        self.mdgd_config = mdgd_config if mdgd_config is not None else MDGDConfig()
        model = kwargs.get("model", args[0] if args else None)
        if model is None:
            raise ValueError("MDGDTrainer needs model")
        if self.mdgd_config.trainable is not None:
            mark_trainable(model, self.mdgd_config.trainable)  # before the optimizer is built
        if self.mdgd_config.mode == "ft":
            ref_model = None
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        prepare_models(self.mdgd_config, model, ref_model, training_args)
        super().__init__(*args, **kwargs)
        if self.mdgd_config.max_grad_norm is not None:  # the Trainer clips the direction
            self.args.max_grad_norm = self.mdgd_config.max_grad_norm
        self.strategy = trainer_strategy(self)
        if ref_model is not None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            unshare(ref_model, model)  # accelerate's prepare will wrap theta's modules alone
        if ref_model is not None:
            ref_model.to(self.args.device)
        self._ref_model, self._visual = ref_model, visual
        self._resumed: dict[str, Any] | None = None
        self.engine: MDGDEngine | None = None
        if self.strategy.build_at_init:
            self._build_engine()
        self._mdgd_logs: list[dict[str, float]] = []
        self.skipped_samples = 0  # on this rank, since the Trainer was built
        if self.train_dataset is not None:
            self._modality_lengths(self.train_dataset)  # fails early where they are missing

    def _get_train_sampler(
        self, train_dataset: torch.utils.data.Dataset | None = None
    ) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = self._modality_lengths(dataset)
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        args = self.args
        return ModalityLengthGroupedSampler(
            lengths,
            batch_size=self._train_batch_size,  # the DataLoader's batch size
            world_size=args.world_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            seed=args.data_seed if args.data_seed is not None else args.seed,
        )

    def _modality_lengths(self, dataset: Any) -> Any:
        """``dataset.modality_lengths`` when the Trainer groups by modality, else None."""
        lengths = getattr(dataset, "modality_lengths", None)
        grouped = self.group_by_modality_length
        if grouped is None:  # where the ranks must agree on the modality, when it can
            sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled or is_fsdp(self.model)
            grouped = sharded and lengths is not None
        if grouped and lengths is None:
            raise ValueError(
                "group_by_modality_length=True needs the train dataset "
                f"({type(dataset).__name__}) to have modality_lengths: per sample its "
                "length, negated when it is text-only"
            )
        return lengths if grouped else None

    def get_resumed_dataloader(
        self, dataloader: torch.utils.data.DataLoader, num_batches: int
    ) -> torch.utils.data.DataLoader:
        resumed = super().get_resumed_dataloader(dataloader, num_batches)
        # Resuming mid-epoch on several ranks, accelerate's loader nests the sampler as
        # SkipBatchSampler(BatchSamplerShard(BatchSampler(sampler))), one level deeper than
        # its set_epoch (and the Trainer's) looks: attach it where they look, or the
        # resumed epoch would take its batches from another epoch's order.
        sampler = grouped_sampler(dataloader)
        if sampler is not None and hasattr(resumed, "set_sampler"):
            resumed.set_sampler(sampler)
        return resumed

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if self.engine is not None:  # else _build_engine attaches it
            self.strategy.attach_freeze(self.engine, optimizer)
        return optimizer

    def _build_engine(self) -> None:
        model, ref_model = self.strategy.engine_models(self._ref_model)
        scaler = getattr(self.accelerator, "scaler", None)  # fp16 only
        self.engine = MDGDEngine(
            model, ref_model, None, self.mdgd_config, visual=self._visual, scaler=scaler
        )
        self.strategy.engine_built(self.engine)
        if self._resumed is not None:
            self._restore_engine_state(self._resumed)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        if SKIPPED in inputs:  # bad samples the dataset replaced (--on-bad-sample skip)
            inputs = dict(inputs)
            self.skipped_samples += int(inputs.pop(SKIPPED))
        inputs = self._prepare_inputs(inputs)
        if self.engine is None:
            self._build_engine()
            self.strategy.attach_freeze(self.engine, self.optimizer)
        last = self.accelerator.sync_gradients
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            loss = self.engine.backward(inputs, last=last)
        if last:
            figures = self.engine.compute_direction()
            self._mdgd_logs.append(figures)
            self.strategy.after_direction(self.engine, figures)
        return loss / self.current_gradient_accumulation_steps

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

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save and self.engine is not None:
            folder = os.path.join(self._get_output_dir(trial), self._checkpoint_folder())
            state = {"step_count": self.engine.step_count, "pending_logs": self._mdgd_logs}
            with open(os.path.join(folder, STATE_NAME), "w") as f:
                json.dump(state, f)

    def _checkpoint_folder(self) -> str:
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        return f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"

    def _restore_engine_state(self, state: dict[str, Any]) -> None:
        self.engine.step_count = state["step_count"]
        self._mdgd_logs = list(state["pending_logs"])
        self._resumed = None

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        if self.strategy.loads_parameters_with_optimizer():
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.strategy.save_model(output_dir):
            super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.strategy.save_optimizer_and_scheduler(output_dir):
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            state_file = os.path.join(checkpoint, STATE_NAME)
            if os.path.isfile(state_file):
                with open(state_file) as f:
                    self._resumed = json.load(f)
                if self.engine is not None:
                    self._restore_engine_state(self._resumed)
        if checkpoint is None or not self.strategy.load_optimizer_and_scheduler(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
