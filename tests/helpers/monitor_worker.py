"""One rank of the forgetting monitor's 2-rank tests (tests/test_train_monitor.py).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python tests/helpers/monitor_worker.py DMODE OUT

:class:`mdgd.integrations.hf.MDGDTrainer` in ``DMODE`` (``"dp"``: whole models on
every rank; ``"fsdp"``: both models sharded by FSDP2) for 3 steps with a
:class:`ForgettingMonitor` every 2 steps, with eval prompts. The monitor's
``visual_erank`` and ``exact_match`` calls are counted. ``OUT/<DMODE>-<rank>.pt``:
the counts, the monitor's history and ``erank_ref``, the texts it generated, and
the monitor's entries of this rank's ``state.log_history``.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_worker import make_trainer  # noqa: E402
from launch import run_rank  # noqa: E402
from llava_tiny import PAD_ID, random_batch, trainer_args  # noqa: E402

import mdgd.monitor as monitor  # noqa: E402

COUNTED = ("visual_erank", "exact_match")


class DigitTokenizer:
    """Decodes token ids as their numbers, and keeps what it decoded."""

    pad_token_id = PAD_ID

    def __init__(self) -> None:
        self.said: list[str] = []

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.said.append(" ".join(str(i) for i in ids.tolist()))
        return self.said[-1]


def count_calls(calls: dict[str, int]) -> None:
    for name in COUNTED:
        fn = getattr(monitor, name)

        @functools.wraps(fn)
        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)

        setattr(monitor, name, wrapper)


def run(dmode: str, out: str, calls: dict[str, int]) -> dict:
    calls.update(dict.fromkeys(COUNTED, 0))
    args = trainer_args(
        os.path.join(out, dmode),
        learning_rate=1e-2,
        max_steps=3,
        ddp_backend="gloo",
        ddp_timeout=60,
    )
    theta, _, trainer = make_trainer(args, distributed=dmode)
    probe = [random_batch(theta.config, batch_size=2, seed=s) for s in (7, 8)]
    prompts = []
    for seed in (9, 10):
        batch = random_batch(theta.config, batch_size=1, seed=seed)
        prompts.append(({k: v for k, v in batch.items() if k != "labels"}, "never"))
    tokenizer = DigitTokenizer()
    mon = monitor.ForgettingMonitor(
        trainer, probe, every=2, eval_prompts=prompts, tokenizer=tokenizer, max_new_tokens=3
    )
    trainer.add_callback(mon)
    trainer.train()
    logged = [h for h in trainer.state.log_history if any(k in h for k in monitor.KEYS)]
    return {
        "mode": dmode,
        "calls": dict(calls),
        "history": mon.history,
        "erank_ref": mon.erank_ref,
        "said": tokenizer.said,
        "logged": logged,
        "sharded": monitor.is_sharded(theta),
    }


def main() -> None:
    dmode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)

    def body() -> None:
        calls: dict[str, int] = {}
        count_calls(calls)
        result = run(dmode, out, calls)
        torch.save(result, os.path.join(out, f"{dmode}-{os.environ['RANK']}.pt"))

    run_rank(body)


if __name__ == "__main__":
    main()
