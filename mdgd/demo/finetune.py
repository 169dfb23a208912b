"""Phase 2: instruction-tune the pre-trained model on the target task, once per method.

Every method starts from the same pre-trained weights, sees the same batches of
the target task only (no replay of the pre-trained tasks), for the same number of
steps, with AdamW at the same learning rate, and is driven by
:class:`mdgd.MDGDEngine` (``mode="ft"`` is the plain fine-tuning step, so step
times compare like with like). All methods but LoRA train the paper's set: the
last ``num_layers`` language-model layers and the multimodal projector
(:func:`mdgd.llava_trainable_patterns`). LoRA (through ``peft``, when installed)
adds rank-``lora_rank`` adapters to the query and key projections of every
language-model layer, as the paper's LoRA baseline does, and trains only those.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns, mark_trainable

from .evaluate import Evaluation, evaluate
from .tasks import Split


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int = 150
    batch_size: int = 32
    lr: float = 5e-4
    num_layers: int = 2
    lora_rank: int = 8
    alpha: float = 0.1


@dataclass(frozen=True)
class Method:
    name: str
    mode: str  # "ft", "mdgd", "gm" (MDGDConfig.mode) or "lora"
    align: bool = True


METHODS: tuple[Method, ...] = (
    Method("Fine-tune", "ft"),
    Method("LoRA", "lora"),
    Method("MDGD", "mdgd"),
    Method("w/o visual align", "mdgd", align=False),
    Method("MDGD-GM", "gm"),
)


@dataclass
class MethodResult:
    name: str
    trainable_params: int
    updated_params: int  # mean over steps of the elements the update touched (MDGD-GM: a subset)
    step_ms: float  # median wall time of one engine step
    train_seconds: float
    losses: list[float]
    figures: dict[str, float]  # means over steps of the engine's figures
    evaluation: Evaluation | None = None
    checkpoints: dict[int, Evaluation] = field(default_factory=dict)  # steps -> evaluation


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _lora_model(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj)",
    )
    with warnings.catch_warnings():  # peft calls a transformers API deprecated for v6
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, cfg)


def batch_schedule(n: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """The ``[steps, batch_size]`` example indices every method sees, in the same order."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, n, (steps, batch_size), generator=gen)


def finetune(
    method: Method,
    pretrained: torch.nn.Module,
    target: Split,
    eval_splits: dict[str, Split],
    settings: FinetuneSettings,
    seed: int,
    progress: bool = True,
    erank_pictures: int = 200,
    eval_at: tuple[int, ...] = (),
) -> MethodResult:
    """Train a copy of ``pretrained`` with ``method``; evaluate it on ``eval_splits``.

    ``eval_at`` also evaluates after those numbers of steps (``result.checkpoints``).
    Phase 2 has no schedule, so the model after ``k`` of the steps is the model a
    ``k``-step run would give: one run yields the whole steps sweep.
    """
    torch.manual_seed(seed)
    model = copy.deepcopy(pretrained)
    model.train()
    ref = None
    if method.mode == "lora":
        model = _lora_model(model, settings.lora_rank)
        config = MDGDConfig(mode="ft")
    else:
        mark_trainable(model, llava_trainable_patterns(model, settings.num_layers, projector=True))
        config = MDGDConfig(mode=method.mode, align=method.align, alpha=settings.alpha)
        if method.mode != "ft":
            ref = copy.deepcopy(pretrained)
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    engine = MDGDEngine(model, ref, opt, config)

    order = batch_schedule(len(target), settings.steps, settings.batch_size, seed)
    losses, times, figs, checkpoints = [], [], [], {}
    bar = tqdm(
        order, desc=f"phase 2: {method.name}", disable=not progress, unit="step", leave=False
    )
    for done, idx in enumerate(bar, start=1):
        t0 = time.perf_counter()
        f = engine.step(target.batch(idx))
        times.append(time.perf_counter() - t0)
        losses.append(f["loss"])
        figs.append(f)
        bar.set_postfix(loss=f"{f['loss']:.3f}", refresh=False)
        if done in eval_at and done < len(order):
            checkpoints[done] = evaluate(model, eval_splits, erank_pictures=erank_pictures)
    bar.close()

    means = {k: _nanmean([f[k] for f in figs]) for k in ("loss_v", "cos_mean", "selected_fraction")}
    result = MethodResult(
        name=method.name,
        trainable_params=n_trainable,
        updated_params=round(n_trainable * means["selected_fraction"]),
        step_ms=1000.0 * statistics.median(times[1:] or times),
        train_seconds=sum(times),
        losses=losses,
        figures=means,
        evaluation=evaluate(model, eval_splits, erank_pictures=erank_pictures),
        checkpoints=checkpoints,
    )
    if len(order) in eval_at:
        result.checkpoints[len(order)] = result.evaluation
    return result


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")
