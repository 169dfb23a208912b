"""One rank of the data-parallel LLaVA-mix test (tests/test_batches.py).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tests/helpers/dist_mix_worker.py OUT

Rank 0 trains on image batches; rank 1's micro-batch is text-only at every step
(so it skips the ``h`` backward while rank 0 all-reduces ``h`` buckets from
its gradient hooks), and at the last step rank 0's is text-only too. Saves the
final trainable parameters and the figures to ``OUT/mix-<rank>.pt``.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch import run_rank  # noqa: E402
from llava_tiny import perturbed_copy, random_batch, text_only_batch, tiny_llava  # noqa: E402

from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns, mark_trainable  # noqa: E402

STEPS = 3
MODES = ("mdgd", "gm")


def mix_batch(config, rank: int, step: int):
    """Rank 0: an image batch except at the last step; rank 1: always text-only."""
    if rank == 0 and step < STEPS - 1:
        return random_batch(config, seed=100 * step)
    return text_only_batch(config, seed=100 * step + rank + 1)


def mix_engine(mode: str, distributed: str):
    ref = tiny_llava(seed=0)
    theta = perturbed_copy(ref, seed=1)
    pats = llava_trainable_patterns(theta, 2)
    mark_trainable(theta, pats)
    opt = torch.optim.SGD([p for p in theta.parameters() if p.requires_grad], lr=0.5)
    cfg = MDGDConfig(
        mode=mode,
        alpha=0.3,
        trainable=pats,
        distributed=distributed,
        dist_timeout_s=60,
        dist_bucket_mb=2**-9,  # small buckets: most go out from the gradient hooks
    )
    return theta, MDGDEngine(theta, ref, opt, cfg)


def flat_params(theta, engine) -> torch.Tensor:
    params = dict(theta.named_parameters())
    return torch.cat([params[n].detach().reshape(-1).double() for n in engine.param_names])


def main() -> None:
    out = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)

    def body() -> None:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
        results = {}
        for mode in MODES:
            theta, engine = mix_engine(mode, "dp")
            figures = [engine.step(mix_batch(theta.config, rank, s)) for s in range(STEPS)]
            results[mode] = (flat_params(theta, engine), figures)
        torch.save(results, os.path.join(out, f"mix-{rank}.pt"))

    run_rank(body)


if __name__ == "__main__":
    main()
