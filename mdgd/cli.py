"""The ``mdgd`` command: ``mdgd demo`` (visual forgetting, in the shape of the paper's
Table 1, on a laptop CPU), ``mdgd bench`` (the benchmarks of ``benchmarks/``) and ``mdgd info``
(versions, extension and backends, for bug reports)."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

DEMO_DESCRIPTION = """\
Show what MDGD is for, on your CPU, in a few minutes.

Phase 1 trains a small LLaVA (CLIP vision tower + projector + Llama, built from
a config, no download) from scratch on six "pre-trained tasks": the digit of a
real handwritten scan (scikit-learn's digits), and the colour, shape, count and
position of drawn shapes, and whether a circle is among them. The result is
cached, so a second run skips it.

Phase 2 instruction-tunes that model on a held-out "target task" (is the digit
odd? on digits drawn over cluttered coloured backgrounds) with each method
under the same budget: plain fine-tuning, LoRA (if peft is installed), MDGD,
MDGD without visual alignment and MDGD-GM (alpha 0.1). All but LoRA train the
last language-model layers and the projector.

The report gives, per method, the accuracy on every pre-trained task (did it
forget?) and on the target task (did it learn?), Avg, H-score, the trainable
parameters, the effective rank of the visual tokens and the step time; it is
printed and saved as report.json, report.md and report.png, with two verdicts:
whether MDGD forgot less than fine-tuning, and whether its target score is
within 5 points of fine-tuning's (or above). The numbers are whatever this run
measures.

--seeds N repeats both phases over N seeds (mean ± std per cell; a claim holds
only if it holds in every seed). --target caption swaps the yes/no target for
a generated six-word caption (token F1 and exact match). --tradeoff also plots
the target score against the pre-trained tasks' mean along each run.
"""


def build_demo_parser(prog: str = "mdgd demo") -> argparse.ArgumentParser:
    from mdgd.demo.finetune import METHODS
    from mdgd.demo.run import FULL, QUICK, TARGETS

    p = argparse.ArgumentParser(
        prog=prog,
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny model and a few steps (under a minute): checks that everything runs; "
        "its numbers mean little",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the data, the model and the batches (default: 0)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run phases 1 and 2 for this many seeds (--seed, --seed+1, ...): the table "
        "gives mean ± std per cell and the verdict says whether each claim held in every "
        "seed; each seed's report goes to OUT/seed_<s>/ (default: 1)",
    )
    p.add_argument(
        "--target",
        choices=TARGETS,
        default=TARGETS[0],
        help="the phase-2 target task: odd-digit (is the digit odd? yes/no, scored by "
        "accuracy) or caption (a six-word description of a two-part scene, trained with "
        "the language-model loss, scored by token F1 and exact match of greedy "
        "generation) (default: odd-digit)",
    )
    p.add_argument(
        "--tradeoff",
        action="store_true",
        help="also evaluate every method after 1/6, 1/3, 2/3 and all of its phase-2 steps and "
        "plot the target score against the pre-trained tasks' mean (report_tradeoff.png; "
        "the points are in report.json under 'tradeoff')",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("mdgd_demo_out"),
        help="folder for report.json, report.md and report.png (and report_tradeoff.png) "
        "(default: ./mdgd_demo_out)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the phase-1 checkpoint is cached (default: $XDG_CACHE_HOME/mdgd or "
        "~/.cache/mdgd); the file name hashes the model, settings, seed and code version",
    )
    p.add_argument("--no-cache", action="store_true", help="always run phase 1 and save nothing")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of the phase-2 methods, in the order given (default: all: "
        + ", ".join(m.name for m in METHODS)
        + ")",
    )
    p.add_argument(
        "--pretrain-steps",
        type=int,
        default=None,
        help="phase-1 optimizer steps (default: 1500; --quick: 200)",
    )
    p.add_argument(
        "--finetune-steps",
        type=int,
        default=None,
        help="phase-2 optimizer steps per method (default: 150; --quick: 20)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="phase-2 AdamW learning rate, the same for every method (default: 5e-4)",
    )
    p.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="how many of the last language-model layers phase 2 trains, with the "
        f"projector (default: {FULL.finetune.num_layers} of {FULL.model.text_layers}; "
        f"--quick: {QUICK.finetune.num_layers} of {QUICK.model.text_layers})",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: 1). On an idle machine 2 is faster; on a busy one "
        "(other jobs on the cores) several threads can wait on each other and run many "
        "times slower, so the default is the safe one",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def demo_main(argv: list[str] | None = None) -> dict:
    """``mdgd demo``: run the experiment and return the report (a dict, as saved in JSON)."""
    parser = build_demo_parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")

    from mdgd.demo.pretrain import default_cache_dir
    from mdgd.demo.run import FULL, QUICK, run_demo, with_overrides

    methods = None
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    config = with_overrides(
        QUICK if args.quick else FULL,
        seed=args.seed,
        methods=methods,
        pretrain_steps=args.pretrain_steps,
        finetune_steps=args.finetune_steps,
        lr=args.lr,
        num_layers=args.num_layers,
        target=args.target,
        tradeoff=args.tradeoff,
    )
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    return run_demo(
        config,
        args.out,
        cache,
        threads=args.threads,
        progress=not args.no_progress,
        seeds=args.seeds,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mdgd",
        description="Modality-Decoupled Gradient Descent: train, demo, bench and info.",
        epilog="Run 'mdgd COMMAND --help' for the options of each command.",
    )
    sub = p.add_subparsers(dest="command", metavar="{train,demo,bench,info}")
    sub.add_parser(
        "demo",
        help="visual-forgetting experiment: fine-tuning vs MDGD on a small LLaVA (minutes, CPU)",
        add_help=False,
    )
    sub.add_parser(
        "bench",
        help="benchmark the fused MDGD ops against pure-torch versions; 'mdgd bench step': "
        "one training step, fine-tuning vs MDGD",
        add_help=False,
    )
    sub.add_parser(
        "info",
        help="versions, the compiled extension's state and the backends: paste it into bug "
        "reports (the same as python -m mdgd_kernels.info)",
        add_help=False,
    )
    sub.add_parser(
        "train",
        help="fine-tune a LLaVA-family checkpoint on LLaVA-format data with MDGD (docs/train.md)",
        add_help=False,
    )
    return p


def _exit_before_gloo_teardown(code: int) -> None:
    """Under torchrun with a gloo process group: run the exit handlers, then end the
    process without finalizing the interpreter (does not return).

    A gloo worker thread can still be releasing the tensors of the last collective
    when the interpreter finalizes; taking the GIL then aborts the rank ("terminate
    called without an active exception", exit -6) after training has succeeded.
    ``destroy_process_group`` does not stop those threads once
    ``torch.distributed.nn.functional`` is imported after the group exists (its
    default arguments hold the group), which ``transformers`` does.
    """
    import torch.distributed as dist

    if "TORCHELASTIC_RUN_ID" not in os.environ:  # not a torchrun / accelerate launch rank
        return
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    atexit._run_exitfuncs()  # logging, tracker and hub handlers run as at a normal exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _take_local_rank(argv: list[str]) -> list[str]:
    """``argv`` without the ``--local_rank=N`` that DeepSpeed's launcher puts before the
    command (``deepspeed --num_gpus 8 $(which mdgd) train ...``); it sets ``LOCAL_RANK``
    too, which is what the Trainer reads."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        if not out and name in ("--local_rank", "--local-rank"):
            if not value and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _take_local_rank(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if not argv or argv[0] not in ("train", "demo", "bench", "info"):
        parser.parse_args(argv)  # prints help/usage, or the error for an unknown command
        parser.print_help()
        return 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from mdgd.train import main as train_main  # lazy: imports transformers

        code = train_main(rest)
        _exit_before_gloo_teardown(code)
        return code
    if command == "demo":
        demo_main(rest)
    elif command == "info":
        from mdgd_kernels.info import main as info_main

        info_main(rest)
    else:
        bench_main(rest)
    return 0


BENCHMARKS = ("ops", "step")  # modules of mdgd_bench; `mdgd bench` alone is `mdgd bench ops`


def bench_main(argv: list[str]) -> None:
    """``mdgd bench [ops|step] [options]``: run a benchmark of ``benchmarks/``.

    Their code is the package ``mdgd_bench`` (``benchmarks/mdgd_bench/`` in a checkout),
    which the wheel installs beside ``mdgd``; the scripts ``benchmarks/bench_ops.py`` and
    ``bench_step.py`` call the same ``main`` functions, so nothing is written twice.
    """
    name = argv[0] if argv and argv[0] in BENCHMARKS else "ops"
    rest = argv[1:] if argv and argv[0] in BENCHMARKS else argv
    prog = "mdgd bench" if name == "ops" else f"mdgd bench {name}"
    benchmark_module(name).main(rest, prog=prog)


def benchmark_module(name: str) -> ModuleType:
    """``mdgd_bench.<name>``, imported lazily (the demo and training never need it).

    Run from a checkout (installed editable, or only on PYTHONPATH), this mdgd's own
    ``benchmarks/`` folder goes first on ``sys.path``, so that the benchmarks beside it run,
    never those of another install.
    """
    checkout = Path(__file__).resolve().parents[1] / "benchmarks"
    if (checkout / "mdgd_bench").is_dir() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module(f"mdgd_bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != "mdgd_bench":
            raise
        raise SystemExit(
            "mdgd bench: the benchmarks (package mdgd_bench) are not installed beside mdgd; "
            "reinstall mdgd from its wheel, or run `pip install --no-build-isolation -e .` "
            "in a checkout"
        ) from exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
