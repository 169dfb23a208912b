"""One rank of :mod:`bench_startup`: ``mdgd train``'s flags, timed to the first optimizer step.

Writes ``startup-rank<R>.json`` to ``--output_dir``: seconds from ``$BENCH_T0`` (the
benchmark's clock before it launched torchrun) to the end of the first optimizer
step, RSS after the imports and at that step, and peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import psutil
from transformers import TrainerCallback

from mdgd.train import build_parser, prepare


class FirstStep(TrainerCallback):
    def __init__(self) -> None:
        self.seen: dict | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.seen is None:
            self.seen = {
                "seconds_to_first_step": time.time() - float(os.environ["BENCH_T0"]),
                "rss_first_step": psutil.Process().memory_info().rss,
            }


def main() -> None:
    rss_before = psutil.Process().memory_info().rss
    opts, args = build_parser().parse_args_into_dataclasses(args=sys.argv[1:])
    run = prepare(opts, args)
    first = FirstStep()
    run.trainer.add_callback(first)
    run.trainer.train()
    out = dict(
        first.seen,
        rss_before=rss_before,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        samples=len(run.dataset),
        mdgd=os.path.dirname(sys.modules["mdgd"].__file__),
    )
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(args.output_dir, f"startup-rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
