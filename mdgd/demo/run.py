"""``mdgd demo``: phase 1 (pre-train or load from cache), phase 2 (each method), report."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .evaluate import evaluate
from .finetune import METHODS, FinetuneSettings, Method, finetune, peft_available
from .model import ModelSize, count_params
from .pretrain import PretrainSettings, load_or_pretrain
from .report import Row, format_table, summarise, table_rows, verdict, write_all
from .tasks import PRETRAINED_TASKS, TARGET_TASK, make_split


@dataclass(frozen=True)
class DemoConfig:
    size: str = "full"
    model: ModelSize = ModelSize()
    pretrain: PretrainSettings = PretrainSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    target_train: int = 2000
    eval_per_task: int = 400
    erank_pictures: int = 200
    methods: tuple[str, ...] = tuple(m.name for m in METHODS)
    seed: int = 0
    extra: dict = field(default_factory=dict)


QUICK = DemoConfig(
    size="quick",
    model=ModelSize(vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=2, heads=2),
    pretrain=PretrainSettings(steps=200, batch_size=20, lr=5e-4, warmup=20, train_per_task=300),
    finetune=FinetuneSettings(steps=20, batch_size=16, num_layers=1),
    target_train=200,
    eval_per_task=60,
    erank_pictures=30,
)
FULL = DemoConfig()


def method_by_name(name: str) -> Method:
    for m in METHODS:
        if m.name.lower() == name.lower():
            return m
    raise ValueError(f"unknown method {name!r}; choose from {[m.name for m in METHODS]}")


def run_demo(
    config: DemoConfig,
    out_dir: Path,
    cache_dir: Path | None,
    threads: int | None = None,
    progress: bool = True,
    echo=print,
) -> dict:
    """Run the whole experiment; print the table; write the report files; return the report."""
    wall = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    size = config.model
    methods = [method_by_name(n) for n in config.methods]
    skipped = []
    if any(m.mode == "lora" for m in methods) and not peft_available():
        skipped.append("LoRA (peft is not installed: pip install peft)")
        methods = [m for m in methods if m.mode != "lora"]

    # ---- phase 1
    t = time.perf_counter()
    pretrained, pre_summary = load_or_pretrain(
        size, config.pretrain, config.seed, cache_dir, progress=progress
    )
    phase1 = time.perf_counter() - t
    where = f"loaded from cache {pre_summary['path']}" if pre_summary["from_cache"] else "trained"
    echo(f"phase 1: {where} ({count_params(pretrained) / 1e6:.2f}M parameters, {phase1:.1f} s)")

    # ---- data (phase 2 train, everyone's eval)
    mk = lambda task, n, part: make_split(  # noqa: E731
        task, n, config.seed, part, size.image_size, size.num_image_tokens
    )
    eval_splits = {
        t.name: mk(t, config.eval_per_task, "eval") for t in (*PRETRAINED_TASKS, TARGET_TASK)
    }
    target = mk(TARGET_TASK, config.target_train, "train")
    pre_names = [t.name for t in PRETRAINED_TASKS]

    zero = evaluate(pretrained, eval_splits, erank_pictures=config.erank_pictures)
    rows = [Row("Zero-shot", None, zero.accuracy, zero.erank, None)]
    details = {}
    t = time.perf_counter()
    for m in methods:
        res = finetune(
            m,
            pretrained,
            target,
            eval_splits,
            config.finetune,
            config.seed,
            progress,
            erank_pictures=config.erank_pictures,
        )
        params = res.updated_params if m.mode == "gm" else res.trainable_params
        rows.append(Row(m.name, params, res.evaluation.accuracy, res.evaluation.erank, res.step_ms))
        details[m.name] = {
            "trainable_params": res.trainable_params,
            "updated_params_mean": res.updated_params,
            "train_seconds": res.train_seconds,
            "loss_first": res.losses[0],
            "loss_last": sum(res.losses[-10:]) / len(res.losses[-10:]),
            "engine_figures_mean": res.figures,
        }
        pre_mean = summarise(rows[-1], pre_names, TARGET_TASK.name)["pretrained_mean"]
        echo(
            f"phase 2: {m.name:<17} target {100 * rows[-1].accuracy[TARGET_TASK.name]:5.1f}%  "
            f"pre-trained mean {100 * pre_mean:5.1f}%  ({res.train_seconds:.1f} s)"
        )
    phase2 = time.perf_counter() - t

    head, body = table_rows(rows, pre_names, TARGET_TASK.name)
    table = format_table(head, body)
    lines = verdict(rows, pre_names, TARGET_TASK.name) + [f"skipped: {s}" for s in skipped]
    report = {
        "meta": {
            "seed": config.seed,
            "size": config.size,
            "machine": f"{platform.machine()} {platform.processor() or platform.system()}, "
            f"{os.cpu_count()} logical CPUs",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "wall_seconds": time.perf_counter() - wall,
            "phase1_seconds": phase1,
            "phase2_seconds": phase2,
            "pretrain": pre_summary,
            "config": _config_dict(config),
            "skipped": skipped,
        },
        "tasks": {
            "pretrained": pre_names,
            "target": TARGET_TASK.name,
            "answers": {t.name: list(t.answers) for t in (*PRETRAINED_TASKS, TARGET_TASK)},
            "eval_examples": config.eval_per_task,
        },
        "erank_before": summarise(rows[0], pre_names, TARGET_TASK.name)["erank_mean"],
        "methods": [
            {
                "method": r.method,
                "params": r.params,
                "accuracy": r.accuracy,
                **summarise(r, pre_names, TARGET_TASK.name),
                "erank": r.erank,
                "step_ms": r.step_ms,
                **details.get(r.method, {}),
            }
            for r in rows
        ],
        "table": table,
        "verdict": lines,
    }
    report["meta"]["wall_seconds"] = time.perf_counter() - wall
    paths = write_all(Path(out_dir), report, rows, pre_names, TARGET_TASK.name)
    echo("")
    echo(table)
    echo("")
    for line in lines:
        echo(line)
    echo(
        f"\nwall time {report['meta']['wall_seconds']:.1f} s; report: "
        + ", ".join(str(p) for p in paths.values())
    )
    return report


def _config_dict(config: DemoConfig) -> dict:
    d = asdict(config)
    d["methods"] = list(config.methods)
    return d


def with_overrides(config: DemoConfig, **kw) -> DemoConfig:
    """``config`` with the non-None keyword arguments replaced (see the CLI)."""
    fine = {k: kw.pop(k) for k in ("finetune_steps", "lr", "num_layers") if k in kw}
    pre = {k: kw.pop(k) for k in ("pretrain_steps",) if k in kw}
    config = replace(config, **{k: v for k, v in kw.items() if v is not None})
    ft = {
        "steps": fine.get("finetune_steps"),
        "lr": fine.get("lr"),
        "num_layers": fine.get("num_layers"),
    }
    config = replace(
        config, finetune=replace(config.finetune, **{k: v for k, v in ft.items() if v is not None})
    )
    if pre.get("pretrain_steps") is not None:
        config = replace(config, pretrain=replace(config.pretrain, steps=pre["pretrain_steps"]))
    return config
