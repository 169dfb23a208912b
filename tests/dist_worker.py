"""One rank of a multi-process test, launched by tests/test_distributed.py.

    RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/dist_worker.py SCENARIO OUT

torchrun sets the same variables. Scenarios:

* ``steps``: every case of :data:`CASES` (mode x distributed mode), 3 steps on this
  rank's batches; saves the final trainable parameters and the figures to
  ``OUT/steps-<rank>.pt``.
* ``bad``: configurations on which the ranks disagree, one after another; each
  must raise a ValueError on every rank; the messages go to ``OUT/bad-<rank>.json``.
* ``timeout``: rank 1 never builds its engine; rank 0 must raise within the timeout.
* ``trainer``: MDGDTrainer for 3 steps with the process group made by the
  TrainingArguments (accelerate), as under ``torchrun``; ``OUT/trainer-<rank>.pt``.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llava_tiny import (  # noqa: E402
    Examples,
    perturbed_copy,
    random_batch,
    tiny_llava,
    trainer_args,
)

from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns, mark_trainable  # noqa: E402

STEPS = 3
LR = 0.5
# (mode, distributed mode, extra config, optimizer)
CASES = [
    ("mdgd", "dp", {}, "sgd"),
    ("mdgd", "dp", {"align": False}, "sgd"),
    ("gm", "dp", {"alpha": 0.3}, "sgd"),
    ("ft", "dp", {}, "sgd"),
    ("mdgd", "sharded", {}, "sgd"),
    ("mdgd", "sharded", {"align": False}, "sgd"),
    ("gm", "sharded", {"alpha": 0.3}, "sgd"),
    ("ft", "sharded", {}, "sgd"),
    ("mdgd", "dp", {"granularity": "block:700"}, "adamw"),
    ("mdgd", "sharded", {"granularity": "block:700"}, "adamw"),
    ("gm", "sharded", {"alpha": 0.4, "granularity": "global"}, "adamw"),
    # 2 KB buckets (512 fp32 elements): most of them are all-reduced from the gradient
    # hooks while the backward still runs
    ("mdgd", "dp", {"dist_bucket_mb": 2**-9}, "adamw"),
    ("gm", "dp", {"alpha": 0.3, "dist_bucket_mb": 2**-9}, "sgd"),
    ("ft", "dp", {"dist_bucket_mb": 2**-9}, "sgd"),
]


def case_id(case) -> str:
    mode, dmode, extra, optim = case
    return "-".join([mode, dmode, optim] + [f"{k}={v}" for k, v in extra.items()])


def models():
    """theta (perturbed away from phi) and phi; the trainable set has an odd size."""
    ref = tiny_llava(seed=0, vision_hidden=33, heads=1)
    return perturbed_copy(ref, seed=1), ref


def patterns(model) -> list[str]:
    # the last two LM layers, the projector, and one 33-element vision norm: N is odd,
    # so the sharded mode pads, and the shard boundary falls inside a segment
    return llava_trainable_patterns(model, 2) + [r"vision_tower\..*layers\.0\.layer_norm2\.weight"]


def batch_for(config, rank: int, step: int):
    return random_batch(config, batch_size=2, seed=1000 * step + rank)


def optimizer_for(name: str):
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=LR)
    return lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def run_case(case, rank: int, world: int):
    """Final trainable parameters (float64, flat), per-step figures, and the number of
    buckets all-reduced from inside a backward ("dp"), of one case."""
    mode, dmode, extra, optim = case
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    cfg = MDGDConfig(mode=mode, trainable=pats, distributed=dmode, dist_timeout_s=60, **extra)
    factory = optimizer_for(optim)
    if dmode == "dp":
        opt = factory([p for p in theta.parameters() if p.requires_grad])
    else:
        opt = factory
    engine = MDGDEngine(theta, ref, opt, cfg)
    figures = []
    for step in range(STEPS):
        figures.append(engine.step(batch_for(theta.config, rank, step)))
    params = dict(theta.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1).double() for n in engine.param_names])
    return flat, figures, engine.dist.early_buckets


def scenario_steps(rank: int, world: int, out: str) -> None:
    results = {case_id(c): run_case(c, rank, world) for c in CASES}
    torch.save(results, os.path.join(out, f"steps-{rank}.pt"))


def expect_value_error(build) -> str:
    try:
        build()
    except ValueError as e:
        return str(e)
    return "no error"


def scenario_bad(rank: int, world: int, out: str) -> None:
    theta, ref = models()
    pats = patterns(theta)
    msgs = {}

    def engine(cfg_kw, pats_for_rank):
        t, r = copy.deepcopy(theta), copy.deepcopy(ref)
        cfg = MDGDConfig(trainable=pats_for_rank, dist_timeout_s=20, **cfg_kw)
        return MDGDEngine(t, r, None, cfg)

    msgs["trainable"] = expect_value_error(
        lambda: engine({}, pats if rank == 0 else pats[:1])  # rank 1 drops the projector
    )
    msgs["layout"] = expect_value_error(
        lambda: engine({"granularity": "tensor" if rank == 0 else "block:512"}, pats)
    )
    msgs["mode"] = expect_value_error(lambda: engine({"mode": "mdgd" if rank == 0 else "gm"}, pats))
    msgs["dist_mode"] = expect_value_error(
        lambda: engine({"distributed": "dp" if rank == 0 else "sharded"}, pats)
    )

    def wrapped():
        t = copy.deepcopy(theta)
        mark_trainable(t, pats)
        ddp = torch.nn.parallel.DistributedDataParallel(t)
        return MDGDEngine(ddp, copy.deepcopy(ref), None, MDGDConfig())

    msgs["ddp"] = expect_value_error(wrapped)
    # the ranks still agree after all that: a good engine builds and steps
    t, r = copy.deepcopy(theta), copy.deepcopy(ref)
    mark_trainable(t, pats)
    opt = torch.optim.SGD([p for p in t.parameters() if p.requires_grad], lr=LR)
    good = MDGDEngine(t, r, opt, MDGDConfig(trainable=pats, dist_timeout_s=20))
    good.step(batch_for(t.config, rank, 0))
    # a rank with a different number of micro-batches fails at the step, on every rank
    good.backward(batch_for(t.config, rank, 1))
    if rank == 1:
        good.backward(batch_for(t.config, rank, 2))
    msgs["micro_batches"] = expect_value_error(good.step)
    with open(os.path.join(out, f"bad-{rank}.json"), "w") as f:
        json.dump(msgs, f)


def scenario_timeout(rank: int, world: int, out: str) -> None:
    if rank != 0:
        time.sleep(5)  # never builds its engine (rank 0 times out after 2 s)
        return
    theta, ref = models()
    t0 = time.monotonic()
    try:
        MDGDEngine(theta, ref, None, MDGDConfig(trainable=patterns(theta), dist_timeout_s=2))
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    with open(os.path.join(out, "timeout-0.json"), "w") as f:
        json.dump({"message": msg, "seconds": time.monotonic() - t0}, f)


def scenario_trainer(rank: int, world: int, out: str) -> None:
    from mdgd.integrations.hf import MDGDTrainer

    args = trainer_args(
        os.path.join(out, "trainer"),
        learning_rate=1e-2,
        max_grad_norm=1.0,
        weight_decay=0.0,
        max_steps=3,
        ddp_backend="gloo",
        ddp_timeout=60,
    )
    assert dist.is_initialized() and dist.get_world_size() == world, "no process group"
    theta, ref = models()
    cfg = MDGDConfig(mode="mdgd", trainable=patterns(theta), dist_timeout_s=60)
    trainer = MDGDTrainer(
        model=theta,
        ref_model=ref,
        mdgd_config=cfg,
        args=args,
        train_dataset=Examples(theta.config, 16),
    )
    trainer.train()
    engine = trainer.engine
    params = dict(theta.named_parameters())
    flat = torch.cat([params[n].detach().reshape(-1).double() for n in engine.param_names])
    start, ref_now = models()
    start_flat = torch.cat(
        [
            dict(start.named_parameters())[n].detach().reshape(-1).double()
            for n in engine.param_names
        ]
    )
    ref_same = all(torch.equal(a, b) for a, b in zip(ref.parameters(), ref_now.parameters()))
    torch.save(
        {
            "params": flat,
            "start": start_flat,
            "logs": trainer.state.log_history,
            "dist_mode": engine.dist_mode,
            "wrapped": type(trainer.model_wrapped).__name__,
            "ref_unchanged": ref_same,
        },
        os.path.join(out, f"trainer-{rank}.pt"),
    )


SCENARIOS = {
    "steps": scenario_steps,
    "bad": scenario_bad,
    "timeout": scenario_timeout,
    "trainer": scenario_trainer,
}


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    try:
        if scenario != "trainer":  # the Trainer's accelerate state makes its own group
            dist.init_process_group(
                "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
            )
        SCENARIOS[scenario](rank, world, out)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # skip destroy_process_group: a peer may already be gone


if __name__ == "__main__":
    main()
