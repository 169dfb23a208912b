"""MDGDEngine: one optimizer step of Algorithm 1 with two models and four flat buffers.

    engine = MDGDEngine(model, ref_model, optimizer, MDGDConfig(mode="mdgd"))
    figures = engine.step(batch)                  # or: engine.backward(mb) per micro-batch,
                                                  #     then engine.step()

Per micro-batch (docs/math.md §1):

1. forward theta and phi (``ref_model``) on the batch with hidden states (a frozen
   vision tower the two share runs once for both: :mod:`mdgd.reference`); ``L_vl``
   of each from the labels, ``L_v = visual_weight * mean|pi_phi - pi_theta|`` over
   the image tokens (:mod:`mdgd.visual`);
2. every trainable ``.grad`` of theta and phi is pointed at a view of its ``g``
   buffer and ``(L_vl(theta) + L_vl(phi)).backward(retain_graph=True)`` fills
   ``g_theta`` and ``g_phi`` (their trainable parameters are disjoint);
3. the ``.grad`` are pointed at the ``h`` buffers and ``L_v.backward()`` fills
   ``h_theta`` and ``h_phi``.

Micro-batches accumulate in place. At the step the fused op
``mdgd_kernels.mdgd_direction_`` runs once on the accumulated buffers (cached
layout), writing the direction into ``g_theta``; theta's ``.grad`` are pointed
back at the ``g`` views (``None`` for parameters MDGD-GM masks out) and the
optimizer steps. The micro-batches are weighted equally: the direction is
divided by their number (the op is homogeneous of degree 1 in a common scale of
the four gradients, so this equals running it on the mean gradients).

Host synchronisation: one per step (all figures, and MDGD-GM's mask, come back
in one transfer), plus one per micro-batch to check for image tokens only when
``input_ids`` already live on an accelerator.

Where the buffers live, how a backward fills them and how the ranks combine
them is the job of one gradient-exchange strategy (:mod:`mdgd.distributed`,
picked from ``MDGDConfig.distributed`` and the models' wrappers); the engine
calls its methods and never names one. See ``docs/distributed.md``. Where the
strategy cannot keep the forward's graph for the second backward
(``retains_graph`` False), the ``h`` backward runs on a second forward of both
models, with the random state of the first (so dropout draws the same masks).

``mode="ft"`` costs what plain fine-tuning costs: one forward and one backward
of theta into the ``g`` buffer, no reference model, no ``h`` buffers, no op;
``loss_ref``, ``loss_v`` and the cosine figures are reported as NaN.

What the engine checks when it is built is :mod:`mdgd.checks`; the figures a
step returns, and how they are computed, :mod:`mdgd.figures`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import mdgd_kernels

from .batches import MicroBatch, check_batch, nonfinite_reason, step_figures, to_device
from .budget import updated_fraction
from .checks import check_optimizer, check_same_architecture, matching_params, trainable_params
from .config import MDGDConfig
from .distributed import check_micro_batches, exchange_class, make_exchange, resolve_mode
from .figures import FIGURES, conflict_per_param, figures_ft, figures_mdgd, selected_per_param
from .recompute import is_recomputing, recompute_layers
from .reference import shared_forward
from .visual import ImageTokenHidden, VisualHook, visual_l1


class MDGDEngine:
    """MDGD training driver for two models of one architecture (plain PyTorch).

    Args:
        model: theta, the model being trained.
        ref_model: phi, the frozen pre-trained model (same architecture), made before
            training: :func:`mdgd.reference_model` (shares theta's frozen modules) or
            ``copy.deepcopy(model)``. Never updated and never in the optimizer; only the
            parameters with theta's trainable names get gradients. Put in eval
            mode; when ``model`` has transformers' activation checkpointing on,
            phi's layers recompute too (:func:`mdgd.recompute.recompute_layers`).
            May be None for ``mode="ft"``. Wrapped exactly as ``model`` is: both by
            FSDP2 (:func:`mdgd.shard_models`) or both DeepSpeed engines
            (:func:`mdgd.deepspeed_models`), or neither.
        optimizer: steps theta's trainable parameters (None: use
            :meth:`compute_direction` and step yourself, as the HF Trainer does;
            DeepSpeed engines bring their own).
        config: :class:`MDGDConfig`. When ``config.trainable`` is set it is applied
            to both models (``mark_trainable``); otherwise theta's parameters with
            ``requires_grad`` are trained and phi's flags are set to match.
        visual: the visual-representation hook (default :class:`ImageTokenHidden`).
        scaler: a ``torch.amp.GradScaler`` for fp16 autocast. All four gradients are
            scaled by the same factor (the direction is linear in it, the cosines
            are invariant); non-finite steps are then skipped and the scale backed
            off, as GradScaler does, whatever ``config.nonfinite`` says.
        lr_scheduler: stepped once per :meth:`step` (and saved by checkpoints).
        process_group: the ``torch.distributed`` group of the data-parallel ranks
            in ``"dp"`` mode (default: the world; FSDP2 uses its mesh's group).
    """

    def __init__(
        self,
        model: nn.Module,
        ref_model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        config: MDGDConfig | None = None,
        *,
        visual: VisualHook | None = None,
        scaler: torch.amp.GradScaler | None = None,
        lr_scheduler: Any = None,
        process_group: Any = None,
    ) -> None:
        self.config = cfg = config if config is not None else MDGDConfig()
        self.model = model
        self.ref_model = ref_model if cfg.mode != "ft" else None
        if cfg.mode != "ft" and ref_model is None:
            raise ValueError(f"mode={cfg.mode!r} needs ref_model (the frozen pre-trained model)")
        self.distributed = resolve_mode(cfg.distributed, model, self.ref_model)
        strategy = exchange_class(self.distributed)
        # what the engine names and inspects (a DeepSpeed engine's module); self.model runs
        self.module, self.ref_module = strategy.unwrapped(model, self.ref_model, cfg)
        self.optimizer = optimizer
        self.visual = visual if visual is not None else ImageTokenHidden()
        self.scaler = scaler
        self.lr_scheduler = lr_scheduler
        self.step_count = 0

        module, ref_module = self.module, self.ref_module
        if ref_module is not None:
            check_same_architecture(module, ref_module)
        named = trainable_params(module, ref_module, cfg.trainable)
        names = [n for n, _ in named]
        phi_params = None
        if cfg.mode != "ft":
            phi_params = matching_params(module, ref_module, named)
            ref_model.eval()
            if is_recomputing(module):  # phi in eval() would keep all its activations
                recompute_layers(ref_module)
        # a frozen vision tower that phi shares with theta runs once per micro-batch
        self._shared = shared_forward(module, ref_module if cfg.mode != "ft" else None)
        self.exchange = make_exchange(
            strategy,
            cfg,
            names,
            [p for _, p in named],
            phi_params,
            (model, self.ref_model),
            process_group,
        )
        if scaler is not None and not self.exchange.supports_scaler:
            raise ValueError(
                f"a GradScaler is not supported in distributed={self.distributed!r} mode (its "
                "overflow check would see only this rank's shard): train in bf16 instead"
            )
        self.theta, self.phi = self.exchange.theta, self.exchange.phi
        self.device = self.theta.device
        self.segments = self.exchange.segments
        self.layout = self.exchange.layout
        # each segment's parameter; None for "global" (one segment owned by every parameter)
        self._owner = None
        if cfg.granularity != "global":
            index = self.segments.param_index
            self._owner = torch.tensor(index, dtype=torch.int64, device=self.device)
        self._world = self.exchange.world
        if optimizer is not None:
            check_optimizer(optimizer, self.ref_model, self.theta.names, self.theta.params)
        self.freeze = self.exchange.freezer(self)
        # whole parameters (global elements on every strategy), for updated_fraction
        self._param_sizes = torch.tensor(self.exchange.numels, device=self.device)
        if self.freeze is not None and optimizer is not None:
            self.freeze.attach(optimizer)

        self.last_result: mdgd_kernels.MDGDResult | None = None
        self.last_conflict_cos: torch.Tensor | None = None
        self.last_figures: dict[str, float] | None = None
        self._reset()

    # ------------------------------------------------------------------ state

    def _reset(self) -> None:
        self._micro = 0
        self._loss_sums = torch.zeros(3, dtype=torch.float32, device=self.device)
        self._counts = torch.zeros(2, dtype=torch.float32, device=self.device)  # MicroBatch

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches accumulated since the last step."""
        return self._micro

    @property
    def param_names(self) -> list[str]:
        return list(self.theta.names)

    # ------------------------------------------------------------------ backward

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, batch: Mapping[str, Any], *, last: bool = False) -> torch.Tensor:
        """Accumulate one micro-batch's gradients into the buffers (two backward calls).

        Returns ``L_vl(theta)`` of the micro-batch, detached, on the device (no sync).
        ``last=True`` says no other micro-batch follows before the step: in a
        multi-process run the reduction of the ``g`` buffers then starts right
        after their backward and overlaps the ``h`` backward.
        """
        if self.exchange.launched:
            raise RuntimeError(
                "backward() after the last micro-batch (last=True): call compute_direction() "
                "or step() first"
            )
        check_batch(batch)
        if self.config.mode != "ft":
            self.visual.check(self.module, batch)
        batch = to_device(batch, self.device)
        self.exchange.check_micro_batch(self.visual, self.module, batch)
        self._mb = mb = MicroBatch.of(self.visual, self.module, batch, self.config.mode)
        if self._micro == 0:
            self.theta.zero_()
            if self.phi is not None:
                self.phi.zero_()
        try:
            if self.config.mode == "ft":
                loss = self._backward_ft(batch, last)
            else:
                loss = self._backward_mdgd(batch, last)
        except BaseException as e:
            self._reset()  # the partial accumulation is discarded
            self.exchange.discard()
            clearer = self.exchange.collective_error(e)
            if clearer is not None:
                raise clearer from e
            raise
        self._counts += mb.counts(self.device)
        self._micro += 1
        return loss

    def _backward_ft(self, batch: dict[str, Any], last: bool) -> torch.Tensor:
        mb = self._mb
        loss = mb.task_loss(self.model(**batch), "model")
        ex = self.exchange
        ex.point("g")
        ex.before_backward("g", last)
        if mb.check_loss_path(loss, self.theta.names):
            ex.backward("g", (loss,), False, self._scaled)
        ex.after_backward("g", last)
        loss = loss.detach()
        self._loss_sums[0] += loss
        return loss

    def _backward_mdgd(self, batch: dict[str, Any], last: bool) -> torch.Tensor:
        mb, ex = self._mb, self.exchange
        # one forward serves both backward calls unless the strategy frees its graph
        once = ex.retains_graph or mb.text_only
        rng = _rng_state(self.device) if not once else None
        out_t, out_p = self._forward(batch, visual=once and not mb.text_only)
        loss_t, loss_p = mb.task_loss(out_t, "model"), mb.task_loss(out_p, "ref_model")
        losses_v = self._visual_losses(batch, out_t, out_p) if once else None
        del out_t, out_p  # the logits are only needed through the graph

        ex.point("g")
        ex.before_backward("g", last)
        if mb.check_loss_path(loss_t + loss_p, self.theta.names):
            task = (loss_t, loss_p) if ex.separate_losses else (loss_t + loss_p,)
            retain = losses_v is not None and losses_v[0].requires_grad
            ex.backward("g", task, retain, self._scaled)
        ex.after_backward("g", last)  # dp: overlaps the h backward
        if losses_v is None:  # the second forward, drawing the first one's random numbers
            with torch.random.fork_rng(devices=rng[1]):
                _set_rng_state(rng)
                out_t, out_p = self._forward(batch, visual=True)
            losses_v = self._visual_losses(batch, out_t, out_p)
            del out_t, out_p
        loss_v = losses_v[0].detach()
        # False when text-only or when no trainable parameter feeds pi(X^v)
        if losses_v[0].requires_grad:
            ex.point("h")
            ex.before_backward("h", last)
            ex.backward("h", losses_v, False, self._scaled)
        ex.after_backward("h", last)
        losses = torch.stack([loss_t.detach(), loss_p.detach(), loss_v])
        self._loss_sums += losses.float()
        return losses[0]

    def _forward(self, batch: dict[str, Any], visual: bool) -> tuple[Any, Any]:
        """Both models' outputs; with what the visual hook needs when ``visual``."""
        kw = self.visual.forward_kwargs if visual else {}
        with self._shared:
            return self.model(**batch, **kw), self.ref_model(**batch, **kw)

    def _visual_losses(self, batch: dict[str, Any], out_t: Any, out_p: Any) -> tuple:
        """``L_v`` (text-only: 0 with no graph), or under :attr:`separate_losses` one copy
        per model, the other model's side detached: the same value, and each model's
        gradient of it is that model's gradient of ``L_v``."""
        if self._mb.text_only:
            return (torch.zeros((), device=self.device),)
        z_t, mask = self.visual(self.module, batch, out_t)
        z_p, _ = self.visual(self.ref_module, batch, out_p)
        w = self.config.visual_weight
        if not self.exchange.separate_losses:
            return (w * visual_l1(z_p, z_t, mask),)
        return (w * visual_l1(z_p.detach(), z_t, mask), w * visual_l1(z_p, z_t.detach(), mask))

    # ------------------------------------------------------------------ the step

    def compute_direction(self) -> dict[str, float]:
        """Run the fused op once on the accumulated gradients; leave d in theta's ``.grad``.

        Does not step the optimizer (use :meth:`step`, or clip and step yourself).
        After it, theta's ``.grad`` are views of the ``g_theta`` buffer holding the
        direction, ``None`` for parameters MDGD-GM masks out, and phi's are None.
        On a skipped step (``nonfinite="skip"``) theta's ``.grad`` are all None, so
        an ``optimizer.step()`` leaves every parameter and its moments alone; with a
        GradScaler they hold an Inf instead, so that the scaler skips and backs off.
        """
        if self._micro == 0:
            raise RuntimeError(
                "no gradients accumulated: call backward(batch) first, or step(batch)"
            )
        cfg = self.config
        n = self._micro
        try:
            # the direction, and the loss sums, counts and micro-batches over all ranks
            sums = torch.cat([self._loss_sums, self._counts])
            res, total = self.exchange.direction(sums, n)
            self._loss_sums, self._counts = total[:3], total[3:5]
            # every rank runs n micro-batches (checked below, after the step's one sync)
            n_all = n * self._world
            if cfg.mode == "ft":
                figures, selected = self._figures_ft(n_all)
            else:
                figures, selected = self._figures_mdgd(res, n_all)
            frozen = self.freeze is not None
            updated = updated_fraction(cfg.mode, figures[5], selected, self._param_sizes, frozen)
            figures = step_figures(figures, self._loss_sums, self._counts, n_all, cfg.mode, updated)
            parts = [figures, selected.to(figures.dtype), total[5:].to(figures.dtype)]
            values = torch.cat(parts).tolist()  # the one sync
        finally:
            self._reset()
        check_micro_batches(values.pop(), n, self._world)
        out = dict(zip(FIGURES, values[: len(FIGURES)]))
        skipped = out["skipped"] != 0.0
        if skipped and self.scaler is None and cfg.nonfinite == "raise":
            self._raise_nonfinite(out)
        self.exchange.assign_direction(skipped, values[len(FIGURES) :], self.scaler is not None)
        if self.freeze is not None:
            self.freeze.select(self.last_result.mask, values[len(FIGURES) :], skipped)
        self.last_figures = out
        self.step_count += 1
        return out

    def _figures_ft(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.last_result = self.last_conflict_cos = None
        return figures_ft(self._loss_sums, n), torch.empty(0, device=self.device)

    def _figures_mdgd(
        self, res: mdgd_kernels.MDGDResult, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first nine figures (float64) and, in ``gm``, the selected segments per parameter."""
        self.last_result = res
        num_params = len(self.theta.params)
        conflict, defined = conflict_per_param(res, self._owner, num_params)
        self.last_conflict_cos = conflict.float()
        figs = figures_mdgd(res, conflict, defined, self._loss_sums, n, self.layout.sizes_t)
        if self.config.mode != "gm":
            return figs, torch.empty(0, device=self.device)
        return figs, selected_per_param(res, self._owner, num_params)

    def _raise_nonfinite(self, figures: dict[str, float]) -> None:
        self.exchange.release_grads()
        where = nonfinite_reason(figures, self.last_result, self.segments.names)
        raise FloatingPointError(
            f"{where} at step {self.step_count}; no parameter was updated. "
            "Pass MDGDConfig(nonfinite='skip') to skip such steps instead."
        )

    def step(self, batch: Mapping[str, Any] | None = None) -> dict[str, float]:
        """One optimizer step of Algorithm 1 (``backward(batch)`` first when a batch is given).

        Returns the figures named in :data:`FIGURES`.
        """
        owned = self.exchange.owns_optimizer_step
        if self.optimizer is None and not owned:
            raise RuntimeError("this engine has no optimizer: use compute_direction() and step it")
        if batch is not None:
            self.backward(batch, last=True)
        figures = self.compute_direction()
        if owned:  # the wrapper clips (its own setting), steps and schedules
            self.exchange.optimizer_step(bool(figures["skipped"]))
            return figures
        if self.config.max_grad_norm is not None and not figures["skipped"]:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the unscaled direction
            self.clip_grad_norm_(self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif not figures["skipped"]:
            self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        return figures

    def conflict_cos(self) -> dict[str, float]:
        """Per-parameter ``cos(g_theta, h_theta)`` of the last step (NaN off the visual path)."""
        if self.last_conflict_cos is None:
            return {}
        vals = self.last_conflict_cos.tolist()
        names = self.theta.names if len(vals) == len(self.theta.names) else self.segments.names
        return dict(zip(names, vals))

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, path) -> None:
        """Save trainable parameters, optimizer, scheduler, scaler, RNG, step (mdgd.checkpoint)."""
        from .checkpoint import save_checkpoint

        save_checkpoint(self, path)

    def load_checkpoint(self, path) -> None:
        from .checkpoint import load_checkpoint

        load_checkpoint(self, path)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the direction's global norm (over all ranks when sharded); returns it."""
        return self.exchange.clip_grad_norm_(max_norm)


def _rng_state(device: torch.device) -> tuple[torch.Tensor, list, list]:
    """The CPU and ``device``'s random states, for a forward to be replayed."""
    devices = [device] if device.type == "cuda" else []
    return torch.get_rng_state(), devices, [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple[torch.Tensor, list, list]) -> None:
    cpu, devices, states = state
    torch.set_rng_state(cpu)
    for d, st in zip(devices, states):
        torch.cuda.set_rng_state(st, d)
