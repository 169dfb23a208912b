"""``mdgd train``: fine-tune a LLaVA-family checkpoint on LLaVA-format data with MDGD.

    mdgd train --model llava-hf/llava-1.5-7b-hf --data llava_v1_5_mix665k.json \\
        --image-folder data/ --mode mdgd --output_dir out/ --bf16 ...

Every ``transformers.TrainingArguments`` flag is accepted (``--output_dir``,
``--learning_rate``, ``--per_device_train_batch_size``, ``--bf16``,
``--save_steps``, ``--report_to``, ``--resume_from_checkpoint``, ...), plus the
flags of :class:`TrainArguments`. ``docs/train.md`` has the full recipe.

What it does: indexes and checks the data (:mod:`mdgd.data`: one streaming pass,
cached, so bad data fails before any weight is read and a relaunch starts at
once); loads the model and its processor with ``from_pretrained``; makes the
frozen reference model phi in memory, before anything changes, sharing the
model's frozen modules (:func:`mdgd.reference_model`); trains with
:class:`mdgd.integrations.hf.MDGDTrainer` (``--mode lora``: peft adapters,
trained by plain fine-tuning) with the forgetting monitor (:mod:`mdgd.monitor`),
the samples read, decoded and tokenized lazily in the DataLoader workers; saves
the final model (LoRA: merged; the adapter too) with the processor, and prints a
short summary, also written to ``train_summary.json``. Under ``torchrun`` /
``accelerate launch`` the engine runs data-parallel, or sharded with ``--fsdp
full_shard --fsdp_config '{"fsdp_version": 2}'`` (MDGD's own FSDP2 path) or
``--deepspeed CONFIG``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

import mdgd_kernels

from .config import MDGDConfig, llava_trainable_patterns, mark_trainable
from .data import SKIPPED, Collator, DataError, LlavaDataset
from .reference import reference_model

MODES = (*mdgd_kernels.MODES, "lora")  # the op's modes, and peft LoRA
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# vision-language families whose image tokens carry no visual representation
UNSUPPORTED = {"mllama": "it attends to the image through cross-attention layers"}
SUMMARY_NAME = "train_summary.json"
LORA_TARGETS = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj)"


class TrainError(ValueError):
    """A bad ``mdgd train`` input that is not the data's fault (model, flags)."""


@dataclass
class TrainArguments:
    """The flags of ``mdgd train`` beyond ``TrainingArguments``."""

    model: str = field(
        metadata={"help": "checkpoint directory or hub id, loaded with from_pretrained"}
    )
    data: str = field(
        metadata={
            "help": "LLaVA-format training data: a .json list, .jsonl, or LLaVA-NeXT's .yaml "
            "list of them"
        }
    )
    image_folder: str | None = field(
        default=None,
        metadata={
            "help": "folder the samples' 'image' paths are relative to "
            "(default: the data file's folder)"
        },
    )
    mode: str = field(
        default="mdgd",
        metadata={
            "help": "mdgd (MDGD), gm (MDGD-GM: gradient masking), ft (plain fine-tuning) "
            "or lora (peft LoRA adapters, plain fine-tuning)",
            "choices": MODES,
        },
    )
    alpha: float = field(
        default=0.1, metadata={"help": "gm: fraction of trainable elements updated per step"}
    )
    align: bool = field(
        default=True,
        metadata={
            "help": "keep the visual-alignment gradient in the update "
            "(--no-align: the paper's 'w/o visual align')"
        },
    )
    train_layers: int = field(
        default=6, metadata={"help": "train the last K language-model layers (not lora)"}
    )
    projector: bool = field(
        default=True,
        metadata={"help": "train the multimodal projector too (--no-projector: do not)"},
    )
    trainable: list[str] | None = field(
        default=None,
        metadata={
            "help": "regular expressions over parameter names to train instead of "
            "--train-layers/--projector",
            "nargs": "+",
        },
    )
    max_length: int = field(
        default=2048,
        metadata={
            "help": "maximum tokens per sample (image tokens included); longer samples "
            "are truncated, those whose answers would be cut entirely dropped"
        },
    )
    on_bad_sample: str = field(
        default="raise",
        metadata={
            "help": "a sample that fails (an image that does not decode, a bad record): raise "
            "(stop, naming it) or skip (replace it by the next sample of its modality, counted)",
            "choices": ("raise", "skip"),
        },
    )
    group_by_modality_length: bool | None = field(
        default=None,
        metadata={
            "help": "LLaVA's sampler: every optimizer step's samples all have images or are all "
            "text-only (but one of the last two), lengths grouped (default: on under --fsdp "
            "and --deepspeed, which need it)"
        },
    )
    data_cache: str | None = field(
        default=None,
        metadata={
            "help": "folder of the data index cache (default: $MDGD_DATA_CACHE or "
            "~/.cache/mdgd/data)"
        },
    )
    monitor_steps: int = field(
        default=50,
        metadata={"help": "log mdgd/erank (and eval/accuracy) every N optimizer steps; 0: off"},
    )
    monitor_samples: int = field(
        default=32, metadata={"help": "training samples with images in the erank probe set"}
    )
    eval_data: str | None = field(
        default=None,
        metadata={
            "help": "LLaVA-format file with short answers, scored by greedy-generation "
            "exact match as eval/accuracy (its images: --image-folder)"
        },
    )
    eval_max_new_tokens: int = field(
        default=16, metadata={"help": "generation length for --eval-data"}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype the weights are loaded in (both models), e.g. bfloat16 with --bf16 "
            "for a 7B model on one 80 GB GPU",
            "choices": tuple(DTYPES),
        },
    )
    trainable_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the trainable parameters (both models; not lora): float32 master "
            "weights keep small updates that bfloat16 would round away (needs --bf16 or --fp16 "
            "when it differs from --dtype)",
            "choices": tuple(DTYPES),
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "lora: adapter rank"})
    lora_targets: str = field(
        default=LORA_TARGETS, metadata={"help": "lora: regex of the modules given adapters"}
    )


def build_parser():
    from transformers import HfArgumentParser, TrainingArguments

    return HfArgumentParser(
        (TrainArguments, TrainingArguments),
        prog="mdgd train",
        description="Fine-tune a LLaVA-family checkpoint on LLaVA-format data with MDGD "
        "(docs/train.md). Every transformers.TrainingArguments flag is accepted too.",
    )


def load_processor(path: str):
    """(config, processor) of a supported vision-language checkpoint, or a TrainError."""
    from transformers import AutoConfig, AutoProcessor

    if looks_local(path) and not os.path.isdir(path):
        raise TrainError(f"--model {path}: no such directory")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        where = "" if os.path.exists(path) else "not a local directory, and "
        raise TrainError(
            f"--model {path}: {where}cannot load its config ({str(e).splitlines()[0]})"
        ) from e
    image_token = getattr(config, "image_token_id", None)
    if image_token is None:
        image_token = getattr(config, "image_token_index", None)
    kind = model_kind(config)
    if image_token is None or not hasattr(config, "vision_config"):
        raise TrainError(
            f"--model {path}: {kind} is not a supported vision-language model: mdgd train needs "
            "an image-text-to-text model with image tokens in its input (LLaVA, LLaVA-NeXT, "
            "PaliGemma, Idefics3, ...)"
        )
    if config.model_type in UNSUPPORTED:
        raise TrainError(
            f"--model {path}: {kind} is not supported: {UNSUPPORTED[config.model_type]}"
        )
    processor = AutoProcessor.from_pretrained(path)
    if getattr(processor, "chat_template", None) is None:
        raise TrainError(
            f"--model {path}: its processor has no chat template; save one with the processor "
            "(chat_template.jinja) so that prompts are rendered as at inference time"
        )
    return config, processor


def model_kind(config) -> str:
    """``LlavaForConditionalGeneration (model_type 'llava')``: how messages name a model."""
    return f"{'/'.join(config.architectures or [])} (model_type {config.model_type!r})"


def looks_local(path: str) -> bool:
    """Whether ``--model`` names a directory rather than a hub id (``org/name``)."""
    return (
        path.startswith(("/", "./", "../", "~", "."))
        or path.count("/") > 1
        or path.endswith("/")
        or os.sep != "/"
        and os.sep in path
    )


def load_model(path: str, config, dtype: torch.dtype):
    """The checkpoint's weights as an image-text-to-text model (``config`` from load_processor)."""
    from transformers import AutoModelForImageTextToText

    kind = model_kind(config)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    except ValueError as e:  # e.g. a configuration class the auto mapping does not know
        raise TrainError(
            f"--model {path}: {kind} does not load as an image-text-to-text model "
            f"({str(e).splitlines()[0]})"
        ) from e
    model.config.use_cache = False
    return model


def load_data(opts: TrainArguments, args, processor, config) -> LlavaDataset:
    """The training data, indexed and checked (before any weight is loaded)."""
    return LlavaDataset(
        opts.data,
        processor,
        opts.image_folder,
        opts.max_length,
        getattr(config, "image_token_id", None),  # None: the processor's
        on_bad_sample=opts.on_bad_sample,
        cache_dir=opts.data_cache,
        progress=not args.disable_tqdm,
        shared_build=True,  # every rank builds it (prepare runs on each)
    )


def _lora(model, rank: int, targets: str):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    with warnings.catch_warnings():  # peft calls a transformers API deprecated for v6
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, cfg)


def mdgd_config(opts: TrainArguments, model, distributed: str = "auto") -> MDGDConfig:
    """``distributed``: ``"fsdp"`` for MDGD's own FSDP2 path (``--fsdp``), else ``"auto"``."""
    if opts.mode == "lora":
        if distributed != "auto":
            raise TrainError(
                "--mode lora with --fsdp is not supported (the sharded model is not merged): "
                "drop --fsdp, or pass --mode ft"
            )
        return MDGDConfig(mode="ft")  # peft marked the adapters trainable
    patterns = opts.trainable
    if patterns is None:
        try:
            patterns = llava_trainable_patterns(model, opts.train_layers, projector=opts.projector)
        except ValueError as e:
            raise TrainError(f"{e}; pass --trainable REGEX...") from e
    return MDGDConfig(
        mode=opts.mode,
        alpha=opts.alpha,
        align=opts.align,
        trainable=patterns,
        distributed=distributed,
    )


def cast_trainable(models: list, patterns, opts: TrainArguments, args) -> None:
    """Cast the trainable parameters of ``models`` (None entries skipped) to --trainable-dtype."""
    dtype = DTYPES[opts.trainable_dtype]
    if dtype != DTYPES[opts.dtype] and not (args.bf16 or args.fp16):
        raise TrainError(
            f"--dtype {opts.dtype} with --trainable-dtype {opts.trainable_dtype} needs mixed "
            f"precision: add --bf16 (or --fp16), or pass --trainable-dtype {opts.dtype}"
        )
    for model in models:
        if model is not None:
            for _, p in mark_trainable(model, patterns):
                p.data = p.data.to(dtype)


def probe_batches(dataset: LlavaDataset, n: int, pad_id: int, batch_size: int = 4) -> list[dict]:
    """The first ``n`` training samples with images, collated in small batches."""
    idx = (dataset.modality_lengths > 0).nonzero()[0][:n].tolist()
    collate = Collator(pad_id)
    batches = [
        collate([dataset[i] for i in idx[k : k + batch_size]])
        for k in range(0, len(idx), batch_size)
    ]
    return [{k: v for k, v in b.items() if k != SKIPPED} for b in batches]


@dataclass
class Run:
    """What :func:`prepare` builds: train with ``run.trainer.train()``, or :func:`run`."""

    trainer: Any
    processor: Any
    dataset: LlavaDataset
    monitor: Any
    ref_model: torch.nn.Module | None


def prepare(opts: TrainArguments, args) -> Run:
    """Load the model, processor and data, and build the Trainer and the monitor."""
    from .distributed.trainer import launch_mode, prepare_launch, whole_model_loading
    from .integrations.hf import MDGDTrainer

    if opts.mode not in MODES:
        raise TrainError(f"--mode must be one of {MODES}, got {opts.mode!r}")
    prepare_launch(args)
    try:
        distributed = launch_mode(args)  # --fsdp: MDGD's own FSDP2 path, or an error
    except ValueError as e:
        raise TrainError(str(e)) from e
    model_config, processor = load_processor(opts.model)
    train_set = load_data(opts, args, processor, model_config)  # bad data fails before the weights
    with whole_model_loading(args):
        model = load_model(opts.model, model_config, DTYPES[opts.dtype])
    if opts.mode == "lora":
        model = _lora(model, opts.lora_rank, opts.lora_targets)
    config = mdgd_config(opts, model, distributed)
    ref = reference_model(model, config.trainable) if opts.mode in ("mdgd", "gm") else None
    if config.trainable is not None:
        cast_trainable([model, ref], config.trainable, opts, args)
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = processor.tokenizer.eos_token_id
    trainer = MDGDTrainer(
        model=model,
        ref_model=ref,
        mdgd_config=config,
        args=args,
        train_dataset=train_set,
        data_collator=Collator(pad_id),
        processing_class=processor,
        group_by_modality_length=opts.group_by_modality_length,
    )
    # phi: the reference model, or the model itself before any update (ft, lora)
    monitor = build_monitor(trainer, opts, train_set, ref if ref is not None else model, pad_id)
    return Run(trainer, processor, train_set, monitor, ref)


def build_monitor(trainer, opts: TrainArguments, train_set: LlavaDataset, phi, pad_id: int):
    """The forgetting monitor, added to ``trainer`` (None when off or nothing to probe)."""
    from .monitor import ForgettingMonitor

    if opts.monitor_steps <= 0:
        return None
    probe = probe_batches(train_set, opts.monitor_samples, pad_id)
    if not probe:
        warnings.warn(
            "no training sample has an image: the forgetting monitor is off", stacklevel=3
        )
        return None
    eval_prompts = None
    if opts.eval_data:
        processor = train_set.processor
        eval_set = LlavaDataset(
            opts.eval_data, processor, opts.image_folder, None, train_set.image_token_id
        )
        eval_prompts = [eval_set.prompt(i) for i in range(len(eval_set))]
    monitor = ForgettingMonitor(
        trainer,
        probe,
        opts.monitor_steps,
        reference=phi,
        eval_prompts=eval_prompts,
        tokenizer=train_set.processor.tokenizer,
        max_new_tokens=opts.eval_max_new_tokens,
    )
    trainer.add_callback(monitor)
    return monitor


def run(opts: TrainArguments, args, r: Run | None = None) -> dict[str, Any]:
    """Train as the flags say (``r``: what :func:`prepare` built); returns the summary."""
    r = r if r is not None else prepare(opts, args)
    start = time.perf_counter()
    result = r.trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    seconds = time.perf_counter() - start
    out = save_final(r.trainer, r.processor, opts.mode, args.output_dir)
    summary = make_summary(r.trainer, result, seconds, r.dataset, r.monitor, out)
    if r.trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=1)
        print(format_summary(summary))
    return summary


def save_final(trainer, processor, mode: str, output_dir: str) -> dict[str, str]:
    """Save the trained model where ``from_pretrained`` loads it; LoRA: merged + adapter."""
    if mode != "lora":
        trainer.save_model(output_dir)  # model, processor and the mdgd state
        return {"model": output_dir}
    adapter = os.path.join(output_dir, "adapter")
    trainer.save_model(adapter)
    merged = trainer.model.merge_and_unload()
    if trainer.is_world_process_zero():
        merged.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return {"model": output_dir, "adapter": adapter}


def _last(logs: list[dict], key: str) -> float:
    return [h[key] for h in logs if key in h][-1]


def ranks_sum(n: int) -> int:
    """``n`` summed over the ranks (every rank calls it), or ``n`` in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return n
    total = [0] * dist.get_world_size()
    dist.all_gather_object(total, n)
    return sum(total)


def make_summary(trainer, result, seconds: float, data: LlavaDataset, monitor, out) -> dict:
    """The run's summary; every rank calls it (the per-rank bytes are gathered)."""
    from .distributed.trainer import rank_bytes

    logs = trainer.state.log_history
    keys = sorted({k for h in logs for k in h if k.startswith(("mdgd/", "eval/"))})
    figures = {k: v for k in keys if not math.isnan(v := _last(logs, k))}  # ft: no MDGD figures
    losses = [h["loss"] for h in logs if "loss" in h]
    where = dict(out, checkpoints=trainer.args.output_dir)
    if monitor is not None and monitor.history:
        where["erank_plot"] = os.path.join(trainer.args.output_dir, "erank.png")
    return {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 3),
        "samples_per_second": result.metrics.get("train_samples_per_second"),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "samples": len(data),
        "text_only_samples": data.num_text_only,
        "dropped_samples": len(data.dropped),
        "skipped_samples": len(data.invalid) + ranks_sum(trainer.skipped_samples),
        "figures": figures,
        "memory": rank_bytes(trainer),  # per rank: params (both models), grad buffers, optimizer
        "outputs": where,
    }


def format_summary(s: dict) -> str:
    def num(x):
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"

    lines = [
        f"mdgd train: {s['steps']} steps in {s['seconds']:.1f} s "
        f"({num(s['samples_per_second'])} samples/s), loss {num(s['first_loss'])} -> "
        f"{num(s['final_loss'])}",
        f"  data: {s['samples']} samples ({s['text_only_samples']} text-only), "
        f"{s['dropped_samples']} dropped for --max-length, {s['skipped_samples']} skipped "
        "as bad (--on-bad-sample skip)",
    ]
    if s["figures"]:
        lines.append("  " + ", ".join(f"{k} {num(v)}" for k, v in s["figures"].items()))
    if s.get("memory"):
        held = "; ".join(
            f"rank {r}: parameters {b['params'] / 2**20:.2f}, gradient buffers "
            f"{b['grad_buffers'] / 2**20:.2f}, optimizer state {b['optimizer'] / 2**20:.2f}"
            for r, b in enumerate(s["memory"]["per_rank"])
        )
        lines.append(f"  MiB held per rank ({s['memory']['mode']}): {held}")
    lines += [f"  {k}: {v}" for k, v in s["outputs"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``mdgd train``: returns the exit status; a bad input prints one error line (status 2)."""
    parser = build_parser()
    try:  # TrainingArguments checks its flags on construction (e.g. --fsdp's values)
        opts, args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as e:
        print(f"mdgd train: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        run(opts, args)
    except (DataError, TrainError) as e:
        print(f"mdgd train: error: {e}", file=sys.stderr)
        return 2
    return 0
