"""The forgetting monitor: effective rank of the visual tokens (and task accuracy) during training.

    from mdgd.monitor import ForgettingMonitor

    monitor = ForgettingMonitor(trainer, probe_batches, every=50, reference=ref_model)
    trainer.add_callback(monitor)
    trainer.train()              # logs mdgd/erank every 50 steps; erank.png at the end

Visual forgetting shows as a falling effective rank (Eq. 4 of the MDGD paper,
:func:`mdgd.metrics.effective_rank`) of the representations the language model
gives the image tokens. Every ``every`` optimizer steps (and at the first and last
step) the monitor runs the model on a fixed probe set of training samples and logs

* ``mdgd/erank``: the effective rank of the matrix of the last hidden layer's
  vectors at every image-token position of the probe set, stacked
  (``[probe image tokens, hidden]``);
* ``mdgd/erank_ref``: the same of the pre-trained model (phi), measured once;
* ``eval/accuracy`` (with ``eval_prompts``): greedy-generation exact match
  (case- and surrounding-space-insensitive) on short-answer prompts.

It logs through ``trainer.log``, so the figures go wherever ``report_to`` says
and into ``trainer.state.log_history``; it takes the trainer, as TRL's callbacks
do, for that reason. At the end it writes ``erank.json`` and (with matplotlib)
``erank.png``, the effective rank over the steps, to ``args.output_dir``.

Several processes (``torchrun``, ``accelerate launch``): only the world-process-zero
logs the figures and writes the files. Which ranks measure depends on the model
measured (:func:`is_sharded`), so it is decided for theta and phi apart (under
ZeRO-3 through ``mdgd train``, phi is still whole when training starts):

* a whole model on every rank (``"dp"``, DeepSpeed ZeRO-1/2): rank 0 alone runs the
  probe forwards and the generations; the other ranks go on and wait for it in the
  next step's gradient exchange (a measurement must fit in ``--ddp_timeout``);
* a sharded model (FSDP2, DeepSpeed ZeRO-3): a forward gathers the parameters from
  every rank, so every rank runs the same forwards in lockstep (the same probe
  batches and prompts; ``generate`` with ``synced_gpus``, so that a rank whose
  answer ended keeps serving the others' forwards, as transformers' own evaluation
  does), and rank 0 alone logs.

So the other ranks' ``state.log_history`` lacks the monitor's entries. Nothing
reads them there: the reporting integrations report from rank 0, the Trainer
writes ``trainer_state.json`` on rank 0 (``args.should_save``), and on resume every
rank reads that file.

Resuming: the Trainer restores ``state.log_history`` from the checkpoint before
``on_train_begin``; the monitor takes its history up to the resumed step from
there (the entries it had logged, one per step) and appends the new measurements,
so ``erank.json`` and ``erank.png`` cover the whole run. ``mdgd/erank_ref`` is the
logged one too: the reference is measured only when no earlier value is logged,
and never from the trained model after step 0.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .distributed.common import is_fsdp
from .metrics import effective_rank
from .visual import ImageTokenHidden

HISTORY_NAME = "erank.json"
PLOT_NAME = "erank.png"
KEYS = ("mdgd/erank", "mdgd/erank_ref", "eval/accuracy")  # what the monitor logs


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The model whose config holds ``image_token_id`` (a peft wrapper is looked through)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def is_sharded(model: torch.nn.Module) -> bool:
    """True when a forward of ``model`` needs every rank (of several): its parameters are
    sharded by FSDP2 (DTensors) or partitioned by DeepSpeed ZeRO-3 (which gives them
    ``ds_shape``)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    from torch.distributed.tensor import DTensor

    return is_fsdp(model) or any(
        isinstance(p, DTensor) or hasattr(p, "ds_shape") for p in model.parameters()
    )


@torch.no_grad()
def visual_erank(
    model: torch.nn.Module, batches: Sequence[dict[str, Any]], autocast=contextlib.nullcontext
) -> float:
    """Effective rank of ``model``'s last-layer image-token vectors over ``batches``, stacked.

    ``autocast``: a context-manager factory the forwards run in (the Trainer's).
    """
    hook = ImageTokenHidden()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    try:
        for batch in batches:
            batch = _to({k: v for k, v in batch.items() if k != "labels"}, device)
            with autocast():
                out = model(**batch, **hook.forward_kwargs)
            z, mask = hook(_base(model), batch, out)
            rows.append(z[mask].float())
    finally:
        model.train(was_training)
    z = torch.cat(rows)
    if z.shape[0] == 0:
        raise ValueError("the probe set has no image token: give it samples with images")
    return float(effective_rank(z))


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


@contextlib.contextmanager
def _root_gathered(model: torch.nn.Module) -> Iterator[None]:
    """FSDP2: hold the root's own parameters gathered in this block. ``generate`` uses
    some outside a forward of the root (LLaVA's image features, before the first
    forward), where FSDP2's hooks have not gathered them. (transformers' Trainer does
    the same for accelerate's FSDP2 plugin with ``register_fsdp_forward_method``.)"""
    if not is_fsdp(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@torch.no_grad()
def exact_match(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[tuple[dict[str, torch.Tensor], str]],
    max_new_tokens: int = 16,
    autocast=contextlib.nullcontext,
) -> float:
    """Fraction of ``(inputs, answer)`` pairs whose greedy generation equals the answer.

    A sharded model (:func:`is_sharded`) generates with ``synced_gpus``: every rank must
    call this with the same prompts.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    synced = is_sharded(model)
    correct = 0
    try:
        for inputs, answer in prompts:
            inputs = _to(inputs, device)
            with autocast(), _root_gathered(model):
                out = model.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    synced_gpus=synced,
                )
            new = out[0, inputs["input_ids"].shape[1] :]
            text = tokenizer.decode(new, skip_special_tokens=True)
            correct += _normalise(text) == _normalise(answer)
    finally:
        model.train(was_training)
    return correct / len(prompts)


class ForgettingMonitor(TrainerCallback):
    """Logs ``mdgd/erank`` (and ``eval/accuracy``) every ``every`` steps; see the module doc.

    Args:
        trainer: the Trainer it logs through (any ``transformers.Trainer``).
        probe: the probe batches (dicts the model takes, with image tokens).
        every: log every this many optimizer steps (and at the first and last).
        reference: the pre-trained model, whose erank is measured once, when training
            starts (unless a resumed run logged it). None: the model itself is
            measured when training starts from step 0 (before any update it is the
            pre-trained model); :meth:`measure_reference` sets it.
        eval_prompts: ``(inputs, answer)`` pairs for ``eval/accuracy``, or None.
        tokenizer: decodes the generations (needed with ``eval_prompts``).
        max_new_tokens: generation length for ``eval/accuracy``.
    """

    def __init__(
        self,
        trainer: Any,
        probe: Sequence[dict[str, Any]],
        every: int = 50,
        *,
        reference: torch.nn.Module | None = None,
        eval_prompts: Sequence[tuple[dict[str, torch.Tensor], str]] | None = None,
        tokenizer: Any = None,
        max_new_tokens: int = 16,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if eval_prompts and tokenizer is None:
            raise ValueError("eval_prompts need the tokenizer that decodes the generations")
        self.trainer = trainer
        self.probe = list(probe)
        self.every = every
        self.eval_prompts = list(eval_prompts) if eval_prompts else None
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.erank_ref: float | None = None
        self.history: list[dict[str, float]] = []
        self._reference = reference  # measured in on_train_begin, if need be

    def _autocast(self):
        """The Trainer's mixed precision (--bf16 / --fp16), as in its training forwards."""
        return self.trainer.accelerator.autocast()

    def measure_reference(self, model: torch.nn.Module) -> float:
        """Measure phi's erank on the probe set (once; logged beside every theta value)."""
        self.erank_ref = visual_erank(model, self.probe, self._autocast)
        return self.erank_ref

    def measure(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Measure ``model`` at ``step``: the figures, also appended to :attr:`history`."""
        figures = {"mdgd/erank": visual_erank(model, self.probe, self._autocast)}
        if self.erank_ref is not None:
            figures["mdgd/erank_ref"] = self.erank_ref
        if self.eval_prompts:
            figures["eval/accuracy"] = exact_match(
                model, self.tokenizer, self.eval_prompts, self.max_new_tokens, self._autocast
            )
        self.history.append({"step": step, **figures})
        return figures

    @staticmethod
    def _measures_here(model: torch.nn.Module, state) -> bool:
        """Rank 0 measures; every rank does when the model is sharded (module doc)."""
        return state.is_world_process_zero or is_sharded(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # a resumed run: the history and phi's erank that the checkpoint's log holds
        self.history = logged_history(state.log_history, state.global_step)
        if self.erank_ref is None:
            self.erank_ref = next(
                (h["mdgd/erank_ref"] for h in reversed(self.history) if "mdgd/erank_ref" in h),
                None,
            )
        phi = self._reference if self._reference is not None else model
        self._reference = None
        if phi is None or self.erank_ref is not None:
            return
        if phi is model and state.global_step > 0:
            return  # the model is no longer the pre-trained one
        if self._measures_here(phi, state):
            self.measure_reference(phi)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        due = step % self.every == 0 or step == 1 or step >= state.max_steps
        if model is None or not due or not self._measures_here(model, state):
            return
        figures = self.measure(model, step)
        if state.is_world_process_zero:
            should_log = control.should_log  # Trainer.log resets it: keep the Trainer's own log
            self.trainer.log(figures)
            control.should_log = should_log

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.history:
            save_history(self.history, self.erank_ref, args.output_dir)


def logged_history(log_history: list[dict[str, Any]], upto: int) -> list[dict[str, float]]:
    """The monitor's entries of a Trainer's ``state.log_history`` up to step ``upto``,
    one per step (the last logged), in step order, with only the monitor's keys."""
    by_step = {}
    for entry in log_history:
        step = entry.get("step")
        if "mdgd/erank" in entry and step is not None and step <= upto:
            by_step[step] = {"step": step, **{k: entry[k] for k in KEYS if k in entry}}
    return [by_step[s] for s in sorted(by_step)]


def save_history(history: list[dict[str, float]], erank_ref: float | None, out: str) -> None:
    """``erank.json`` and, with matplotlib, ``erank.png`` (erank over the steps) in ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, HISTORY_NAME), "w") as f:
        json.dump({"erank_ref": erank_ref, "history": history}, f, indent=1)
    try:
        import matplotlib
    except ImportError:
        warnings.warn(
            "matplotlib is not installed: no erank.png (erank.json has the figures)", stacklevel=2
        )
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["mdgd/erank"] for h in history], marker="o", label="theta (training)")
    if erank_ref is not None and math.isfinite(erank_ref):
        ax.axhline(erank_ref, color="grey", linestyle="--", label="phi (pre-trained)")
    scored = [h for h in history if "eval/accuracy" in h]
    if scored:
        ax2 = ax.twinx()
        ax2.plot(
            [h["step"] for h in scored],
            [h["eval/accuracy"] for h in scored],
            color="tab:orange",
            marker="x",
            label="eval accuracy",
        )
        ax2.set_ylabel("eval accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("effective rank of the visual tokens")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, PLOT_NAME), dpi=120)
    plt.close(fig)
