"""MDGDConfig and the choice of trainable parameters.

    config = MDGDConfig(mode="mdgd", trainable=llava_trainable_patterns(model, num_layers=6))

``trainable`` is a list of regular expressions over parameter names
(``re.search``); a parameter is trainable when one of them matches.
:func:`llava_trainable_patterns` writes the paper's setting (the last N
language-model layers plus the multimodal projector, Model Tailor's protocol).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from mdgd_kernels import ALPHA_BY, MODES, NONFINITE

from .families import PROJECTOR_SUFFIXES, config_modules, trainable_modules

# the strategies of mdgd.distributed (which checks that it has one per name) and "auto"
DISTRIBUTED = ("auto", "none", "dp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class MDGDConfig:
    """What one MDGD step computes (docs/math.md §1 and §5-8).

    Args:
        mode: ``"mdgd"`` (Eq. 10), ``"gm"`` (MDGD-GM, Eq. 12) or ``"ft"`` (plain
            fine-tuning: one forward/backward of theta, no reference model).
        align: keep the visual-alignment gradient ``h_theta`` in the update
            (False is the paper's "w/o visual align").
        alpha: fraction in (0, 1] of trainable elements (or segments) ``gm`` updates.
        alpha_by: ``"elements"`` or ``"segments"``: what ``alpha`` counts.
        visual_weight: scale of ``L_v`` (Eq. 6).
        granularity: the segments the projections are computed on: ``"tensor"``
            (one per parameter), ``"global"`` (one for all) or ``"block:K"``
            (every parameter cut into blocks of K elements).
        nonfinite: ``"raise"`` (FloatingPointError naming the parameter) or
            ``"skip"`` (leave every parameter unchanged this step).
        trainable: regular expressions over parameter names, or None to keep the
            models' own ``requires_grad`` flags.
        backend: the op backend (``None``: automatic; see ``mdgd_kernels``).
        eps: relative threshold under which a projected norm is degenerate.
        distributed: multi-process mode (:mod:`mdgd.distributed`): ``"dp"`` (every
            rank all-reduces the four gradient buffers and runs the op),
            ``"fsdp"`` (both models wrapped by FSDP2: sharded weights, gradients
            and optimizer state), ``"deepspeed"`` (both models DeepSpeed ZeRO-1/2/3
            engines), ``"none"`` (one process), or ``"auto"``: ``"fsdp"`` for
            FSDP2 models, ``"deepspeed"`` for DeepSpeed engines, else ``"dp"`` when
            ``torch.distributed`` is initialised with more than one rank, else
            ``"none"``.
        dist_timeout_s: seconds a rank waits for a collective of the driver before
            it raises instead of hanging (gloo; under NCCL the process group's
            own timeout applies to the per-step collectives, see the doc).
        dist_bucket_mb: size of the all-reduce buckets of ``"dp"`` mode, in MB.
        max_grad_norm: clip the direction's global norm to this before the
            optimizer steps (:meth:`MDGDEngine.step`; ``MDGDTrainer`` passes it to
            the Trainer's own clipping); None: no clipping.
        freeze_unselected: MDGD-GM with ``"block:K"``: restore the unselected
            blocks of partly selected parameters, and their optimizer moments,
            after each optimizer step, so that exactly the selected elements
            change (momentum and weight decay would otherwise move the zero-gradient
            blocks). Costs a copy of the partly selected tensors and their moments.
    """

    mode: str = "mdgd"
    align: bool = True
    alpha: float = 0.1
    alpha_by: str = "elements"
    visual_weight: float = 1.0
    granularity: str = "tensor"
    nonfinite: str = "raise"
    trainable: Sequence[str] | None = None
    backend: str | None = None
    eps: float = 1e-6
    distributed: str = "auto"
    dist_timeout_s: float = 600.0
    dist_bucket_mb: float = 25.0
    max_grad_norm: float | None = None
    freeze_unselected: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.alpha_by not in ALPHA_BY:
            raise ValueError(f"alpha_by must be one of {ALPHA_BY}, got {self.alpha_by!r}")
        if self.nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {self.nonfinite!r}")
        if self.distributed == "sharded":
            raise ValueError(
                "distributed='sharded' was removed: shard with FSDP2 instead, e.g. "
                "mdgd.shard_models(model, ref_model) and MDGDConfig(distributed='fsdp'); "
                "see docs/distributed.md"
            )
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"distributed must be one of {DISTRIBUTED}, got {self.distributed!r}")
        if not float(self.dist_timeout_s) > 0.0:
            raise ValueError(f"dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        if not float(self.dist_bucket_mb) > 0.0:
            raise ValueError(f"dist_bucket_mb must be > 0, got {self.dist_bucket_mb}")
        if self.max_grad_norm is not None and not float(self.max_grad_norm) > 0.0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        if not 0.0 < float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not float(self.visual_weight) >= 0.0:
            raise ValueError(f"visual_weight must be >= 0, got {self.visual_weight}")
        _ = self.block_size  # validates granularity
        if self.trainable is not None:
            if isinstance(self.trainable, str):
                raise ValueError(
                    f"trainable must be a list of regular expressions, got the string "
                    f"{self.trainable!r}; wrap it in a list"
                )
            object.__setattr__(self, "trainable", tuple(self.trainable))
            for pat in self.trainable:
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ValueError(f"trainable pattern {pat!r} is not a regex: {e}") from e

    def op_kwargs(self) -> dict[str, Any]:
        """The direction's settings as keyword arguments of the ops.

        One path from the config to :func:`mdgd_kernels.mdgd_direction_`,
        :func:`mdgd_kernels.coefficients` and the float64 oracle
        (``mode``, ``alpha``, ``align``, ``alpha_by``, ``eps``).
        """
        return {
            "mode": self.mode,
            "alpha": self.alpha,
            "align": self.align,
            "alpha_by": self.alpha_by,
            "eps": self.eps,
        }

    @property
    def block_size(self) -> int | None:
        """K of ``"block:K"``; None for ``"tensor"`` and ``"global"``."""
        g = self.granularity
        if g in ("tensor", "global"):
            return None
        if g.startswith("block:"):
            try:
                k = int(g[len("block:") :])
            except ValueError:
                k = 0
            if k > 0:
                return k
        raise ValueError(
            f"granularity must be 'tensor', 'global' or 'block:K' with K a positive integer, "
            f"got {g!r}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["trainable"] is not None:
            d["trainable"] = list(d["trainable"])
        return d


def mark_trainable(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` True on parameters whose name matches a pattern, False elsewhere.

    Returns the trainable ``(name, parameter)`` pairs in ``named_parameters`` order.
    Raises ValueError when no parameter matches.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    regexes = [re.compile(p) for p in patterns]
    chosen = []
    for name, p in model.named_parameters():
        hit = any(r.search(name) for r in regexes)
        p.requires_grad_(hit)
        if hit:
            chosen.append((name, p))
    if not chosen:
        names = [n for n, _ in model.named_parameters()]
        sample = ", ".join(names[:3] + (["..."] if len(names) > 4 else []) + names[-1:])
        raise ValueError(
            f"no parameter of {type(model).__name__} matches the trainable patterns "
            f"{list(patterns)}; its parameter names look like: {sample}"
        )
    return chosen


def llava_trainable_patterns(model_or_config, num_layers: int, projector: bool = True) -> list[str]:
    """The paper's trainable set: the last ``num_layers`` language-model layers (+ projector).

    ``model_or_config`` is a model of a known MLLM family (LLaVA, LLaVA-NeXT,
    LLaVA-OneVision, VipLLaVA, Aya Vision, Mistral3, InternVL, PaliGemma,
    Gemma3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics2/3, SmolVLM; others by the
    usual module names), whose decoder layers and projector are looked up
    (:mod:`mdgd.families`), or its config (the family's transformers 5 names of
    the ``...ForConditionalGeneration`` class are assumed). When they cannot be
    found the error lists the ModuleLists and projector-like modules it saw.
    The final norm and ``lm_head`` stay frozen, as in Model Tailor's protocol.
    """
    if isinstance(model_or_config, nn.Module):
        found = trainable_modules(model_or_config)
        if projector and not found.projector:
            raise ValueError(
                f"{type(model_or_config).__name__} has no module known as its projector "
                f"({', '.join(PROJECTOR_SUFFIXES)}); pass projector=False or add the "
                "projector's pattern by hand"
            )
    else:
        found = config_modules(model_or_config)
    layers, total, proj = found
    if not isinstance(num_layers, int) or not 0 <= num_layers <= total:
        raise ValueError(f"num_layers must be an integer in [0, {total}], got {num_layers!r}")
    patterns = []
    if num_layers:
        ids = "|".join(str(i) for i in range(total - num_layers, total))
        patterns.append(rf"^{re.escape(layers)}\.({ids})\.")
    if projector:
        patterns += [rf"^{re.escape(name)}(\.|$)" for name in proj]
    if not patterns:
        raise ValueError("num_layers=0 and projector=False select nothing")
    return patterns
