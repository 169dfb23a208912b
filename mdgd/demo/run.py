"""``mdgd demo``: phase 1 (pre-train or load from cache), phase 2 (each method), report.

:func:`run_demo` runs it for one seed or several (each seed its own pre-trained
model, data and batch order: phase 1 is part of the variance), and, with
``DemoConfig.tradeoff``, evaluates every method along its phase-2 run as well.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .caption import NAME as CAPTION
from .caption import make_caption_split
from .evaluate import Evaluation, evaluate
from .finetune import METHODS, FinetuneSettings, Method, finetune, peft_available
from .model import ModelSize, count_params
from .pretrain import PretrainSettings, load_or_pretrain
from .report import (
    Row,
    aggregate,
    aggregate_rows,
    claims,
    format_table,
    method_lines,
    summarise,
    table_rows,
    write_all,
)
from .tasks import PRETRAINED_TASKS, TARGET_TASK, Split, make_split

TARGETS = (TARGET_TASK.name, CAPTION)
# the trade-off sweep evaluates after these fractions of the phase-2 steps
TRADEOFF_FRACTIONS = (1 / 6, 1 / 3, 2 / 3, 1.0)


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
    target: str = TARGET_TASK.name
    tradeoff: bool = False
    extra: dict = field(default_factory=dict)

    def tradeoff_steps(self) -> tuple[int, ...]:
        """The numbers of phase-2 steps after which ``--tradeoff`` evaluates."""
        steps = self.finetune.steps
        return tuple(sorted({max(1, round(f * steps)) for f in TRADEOFF_FRACTIONS}))


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


def _data(config: DemoConfig) -> tuple[dict[str, Split], Split]:
    """The eval splits of every task (pre-trained tasks, then the target) and the target's
    training split."""
    size = config.model
    args = (config.seed, "eval", size.image_size, size.num_image_tokens)
    splits = {t.name: make_split(t, config.eval_per_task, *args) for t in PRETRAINED_TASKS}
    if config.target == CAPTION:
        splits[CAPTION] = make_caption_split(config.eval_per_task, *args)
        train = make_caption_split(config.target_train, config.seed, "train", *args[2:])
    elif config.target == TARGET_TASK.name:
        splits[TARGET_TASK.name] = make_split(TARGET_TASK, config.eval_per_task, *args)
        train = make_split(TARGET_TASK, config.target_train, config.seed, "train", *args[2:])
    else:
        raise ValueError(f"unknown target {config.target!r}; choose from {TARGETS}")
    return splits, train


def _row(name: str, params: int | None, ev: Evaluation, step_ms: float | None) -> Row:
    return Row(name, params, ev.score, ev.erank, step_ms, ev.exact_match)


def run_seed(
    config: DemoConfig,
    cache_dir: Path | None,
    progress: bool = True,
    echo=print,
) -> tuple[dict, list[Row]]:
    """Phases 1 and 2 for ``config.seed``: the report (a dict, as saved) and the rows."""
    wall = time.perf_counter()
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
    echo(
        f"seed {config.seed}, phase 1: {where} "
        f"({count_params(pretrained) / 1e6:.2f}M parameters, {phase1:.1f} s)"
    )

    # ---- phase 2
    eval_splits, target = _data(config)
    pre_names, tgt = [t.name for t in PRETRAINED_TASKS], config.target
    zero = evaluate(pretrained, eval_splits, erank_pictures=config.erank_pictures)
    rows = [_row("Zero-shot", None, zero, None)]
    details, sweep = {}, {}
    eval_at = config.tradeoff_steps() if config.tradeoff else ()
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
            eval_at=eval_at,
        )
        params = res.updated_params if m.mode == "gm" else res.trainable_params
        rows.append(_row(m.name, params, res.evaluation, res.step_ms))
        details[m.name] = {
            "trainable_params": res.trainable_params,
            "updated_params_mean": res.updated_params,
            "train_seconds": res.train_seconds,
            "loss_first": res.losses[0],
            "loss_last": sum(res.losses[-10:]) / len(res.losses[-10:]),
            "engine_figures_mean": res.figures,
        }
        if eval_at:
            sweep[m.name] = [(0, zero), *sorted(res.checkpoints.items())]
        s = summarise(rows[-1], pre_names, tgt)
        echo(
            f"seed {config.seed}, phase 2: {m.name:<17} target {100 * s['target']:5.1f}%  "
            f"pre-trained mean {100 * s['pretrained_mean']:5.1f}%  ({res.train_seconds:.1f} s)"
        )
    phase2 = time.perf_counter() - t

    report = {
        "meta": {
            "seed": config.seed,
            "seeds": [config.seed],
            "size": config.size,
            "machine": f"{platform.machine()} {platform.processor() or platform.system()}, "
            f"{os.cpu_count()} logical CPUs",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "phase1_seconds": phase1,
            "phase2_seconds": phase2,
            "pretrain": pre_summary,
            "config": _config_dict(config),
            "skipped": skipped,
        },
        "tasks": _tasks_dict(config, pre_names),
        "erank_before": summarise(rows[0], pre_names, tgt)["erank_mean"],
        "methods": [
            {
                "method": r.method,
                "params": r.params,
                "score": r.score,
                **({"exact_match": r.exact_match} if r.exact_match else {}),
                **summarise(r, pre_names, tgt),
                "erank": r.erank,
                "step_ms": r.step_ms,
                **details.get(r.method, {}),
            }
            for r in rows
        ],
        "verdict": method_lines([rows], pre_names, tgt)
        + claims([rows], [config.seed], pre_names, tgt)
        + [f"skipped: {s}" for s in skipped],
    }
    if sweep:
        report["tradeoff"] = _tradeoff(
            {n: [(k, _row(n, None, ev, None)) for k, ev in pts] for n, pts in sweep.items()},
            config,
        )
    report["meta"]["wall_seconds"] = time.perf_counter() - wall
    return report, rows


def _tasks_dict(config: DemoConfig, pre_names: list[str]) -> dict:
    answers = {t.name: list(t.answers) for t in (*PRETRAINED_TASKS, TARGET_TASK)}
    return {
        "pretrained": pre_names,
        "target": config.target,
        "target_metric": "token F1" if config.target == CAPTION else "accuracy",
        "answers": {k: v for k, v in answers.items() if k in pre_names or k == config.target},
        "eval_examples": config.eval_per_task,
    }


def _tradeoff(sweep: dict[str, list[tuple[int, Row]]], config: DemoConfig) -> dict:
    """The trade-off points of one seed: per method, per number of steps, the pre-trained
    tasks' mean and the target score (both in %)."""
    pre_names = [t.name for t in PRETRAINED_TASKS]
    points = {
        name: [
            {
                "steps": k,
                "pretrained_mean": 100 * summarise(r, pre_names, config.target)["pretrained_mean"],
                "target": 100 * r.score[config.target],
            }
            for k, r in pts
        ]
        for name, pts in sweep.items()
    }
    return {
        "knob": "phase-2 steps",
        "lr": config.finetune.lr,
        "target": config.target,
        "metric": "token F1" if config.target == CAPTION else "accuracy",
        "seeds": [config.seed],
        "methods": points,
    }


def _mean_tradeoff(tradeoffs: list[dict]) -> dict:
    """The seeds' trade-off points averaged point by point (same methods and steps)."""
    first = tradeoffs[0]
    methods = {
        name: [
            {
                "steps": p["steps"],
                **{
                    key: sum(t["methods"][name][i][key] for t in tradeoffs) / len(tradeoffs)
                    for key in ("pretrained_mean", "target")
                },
            }
            for i, p in enumerate(points)
        ]
        for name, points in first["methods"].items()
    }
    seeds = [s for t in tradeoffs for s in t["seeds"]]
    return {**first, "seeds": seeds, "methods": methods, "per_seed": tradeoffs}


def run_demo(
    config: DemoConfig,
    out_dir: Path,
    cache_dir: Path | None,
    threads: int | None = None,
    progress: bool = True,
    echo=print,
    seeds: int = 1,
) -> dict:
    """Run the experiment for ``seeds`` seeds (``config.seed`` on); print the table; write
    the report files; return the report.

    With several seeds each seed's report goes to ``out_dir/seed_<s>/`` and
    ``out_dir/report.*`` holds the mean ± std table and the verdict over seeds.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    wall = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    seed_list = [config.seed + i for i in range(seeds)]
    pre_names, tgt = [t.name for t in PRETRAINED_TASKS], config.target
    reports, runs = [], []
    for s in seed_list:
        report, rows = run_seed(replace(config, seed=s), cache_dir, progress, echo)
        if seeds > 1:
            _write(Path(out_dir) / f"seed_{s}", report, [rows], pre_names, tgt)
        reports.append(report)
        runs.append(rows)
    if seeds == 1:
        report = reports[0]
    else:
        report = {
            "meta": {
                **{k: v for k, v in reports[0]["meta"].items() if k not in ("seed", "pretrain")},
                "seeds": seed_list,
                "per_seed_wall_seconds": [r["meta"]["wall_seconds"] for r in reports],
            },
            "tasks": reports[0]["tasks"],
            "per_seed": [r["files"]["json"] for r in reports],
            "verdict": method_lines(runs, pre_names, tgt)
            + claims(runs, seed_list, pre_names, tgt)
            + [f"skipped: {s}" for s in reports[0]["meta"]["skipped"]],
        }
        if config.tradeoff:
            report["tradeoff"] = _mean_tradeoff([r["tradeoff"] for r in reports])
    report["meta"]["wall_seconds"] = time.perf_counter() - wall
    paths = _write(Path(out_dir), report, runs, pre_names, tgt)
    echo("")
    echo(report["table"])
    echo("")
    for line in report["verdict"]:
        echo(line)
    echo(
        f"\nwall time {report['meta']['wall_seconds']:.1f} s; report: "
        + ", ".join(str(p) for p in paths.values())
    )
    return report


def _write(out_dir: Path, report: dict, runs: list[list[Row]], pre_names, tgt) -> dict:
    """Add the table to ``report`` (one seed: plain; several: mean ± std) and write it."""
    head, body = table_rows(runs[0], pre_names, tgt)
    agg = aggregate(runs, pre_names, tgt)
    if len(runs) > 1:
        body = aggregate_rows(agg, head)
        report["aggregate"] = agg
    report["table"] = format_table(head, body)
    return write_all(out_dir, report, head, body, agg, pre_names)


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
