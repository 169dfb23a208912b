"""One rank of a DeepSpeed test, launched by tests/test_deepspeed.py (2 gloo ranks, CPU).

    DS_ACCELERATOR=cpu RANK=r WORLD_SIZE=2 ... python tests/helpers/ds_worker.py SCENARIO OUT

Scenarios:

* ``steps``: every case of :data:`CASES` on DeepSpeed engines (:func:`mdgd.deepspeed_models`),
  3 steps on this rank's micro-batches; the state before each step and after the last
  (:func:`capture`, the format of ``step_check.capture``), the figures, whether phi
  stayed unchanged and the bytes of mdgd's buffers go to ``OUT/steps-<rank>.pt``.
* ``ckpt``: ZeRO-3, 2 steps, a checkpoint, 2 more steps; then fresh engines resume
  from the checkpoint and run the last 2 steps; ``OUT/ckpt-<rank>.pt``.
* ``bad``: configurations MDGD refuses, each a ValueError naming its key.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_worker import batch_for, models, optimizer_for, patterns  # noqa: E402
from step_check import MOMENTS  # noqa: E402

from mdgd import MDGDConfig, MDGDEngine, deepspeed_models, mark_trainable  # noqa: E402

STEPS = 3
# the first micro-batch of step 1 is text-only on every rank (the ranks must agree)
TEXT_ONLY = ((1, 0),)
CLIP = 0.05  # below the direction's norm on these models: every step clips

# (stage, mode, extra MDGDConfig, optimizer, micro-batches per step, clip)
CASES = [
    (3, "mdgd", {}, "adamw", 1, False),
    (3, "mdgd", {}, "adamw", 2, True),
    (3, "mdgd", {"align": False}, "sgd", 2, False),
    (3, "gm", {"alpha": 0.3, "granularity": "block:700"}, "sgd", 2, False),
    (3, "ft", {}, "adamw", 2, False),
    (2, "mdgd", {}, "adamw", 1, False),
    (2, "mdgd", {}, "adamw", 2, True),
    (2, "mdgd", {"align": False}, "sgd", 2, False),
    (2, "gm", {"alpha": 0.3, "granularity": "block:700"}, "sgd", 1, False),
    (2, "ft", {}, "adamw", 2, False),
]


def case_id(case) -> str:
    stage, mode, extra, optim, micro, clip = case
    parts = [f"zero{stage}", mode, optim, f"micro{micro}"] + [f"{k}={v}" for k, v in extra.items()]
    return "-".join(parts + (["clip"] if clip else []))


def ds_config(stage: int, micro: int, clip: bool) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": micro,
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            # partition every parameter, however small (the tiny model's are all small)
            "stage3_param_persistence_threshold": 0,
            # ZeRO-3 otherwise replaces F.linear by matmul + bias add: other roundings in
            # every micro-batch's gradient than the one-process run's (1-2 ulp measured),
            # which the bound (identical per-micro-batch gradients) does not model
            "memory_efficient_linear": False,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        # DeepSpeed clips at 1.0 unless told otherwise; the one-process run clips at CLIP or not
        "gradient_clipping": CLIP if clip else 0.0,
    }
    return cfg


def mdgd_config(case, pats) -> MDGDConfig:
    stage, mode, extra, optim, micro, clip = case
    return MDGDConfig(
        mode=mode, trainable=pats, max_grad_norm=CLIP if clip else None, dist_timeout_s=60, **extra
    )


def capture(engine, names) -> dict:
    """``step_check.capture``'s format from DeepSpeed's partitions: the fp32 parameters and
    the optimizer's moments, gathered whole (collectives: every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = engine.theta.params
    flat = torch.cat([safe_get_full_fp32_param(p).reshape(-1).double() for p in params])
    moments = {}
    inner = engine.model.optimizer.optimizer
    step = next((float(st["step"]) for st in inner.state.values() if "step" in st), None)
    if step is not None:
        for n, p in zip(names, params):
            got = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS}
            moments[n] = {k: v.detach().clone() for k, v in got.items() if v is not None}
            moments[n]["step"] = step
    res = engine.last_result
    return {
        "params": flat,
        "moments": moments,
        "mask": None if res is None else res.mask.cpu().clone(),
    }


def _buffers(engine) -> list[torch.Tensor]:
    from step_check import _buffers as buffers

    return [b.detach().clone() for b in buffers(engine)]


def plain_engine(case, pats) -> MDGDEngine:
    """One process's engine on plain copies of the models (no optimizer: its backward only)."""
    stage, mode, extra, optim, micro, clip = case
    theta, ref = models()
    mark_trainable(theta, pats)
    cfg = MDGDConfig(mode=mode, trainable=pats, distributed="none", **extra)
    return MDGDEngine(theta, ref if mode != "ft" else None, None, cfg)


def record_reads(engine) -> list:
    """Record each micro-batch gradient exactly as mdgd's exchange reads it from DeepSpeed
    (``[4, local N]`` per micro-batch: gt, ht, gp, hp); the exchange still adds it to its
    buffers with the same one addition."""
    ex, log, kind = engine.exchange, [], {}
    orig_after, orig_read = ex.after_backward, ex._read

    def after_backward(k: str, last: bool) -> None:
        kind["now"] = k
        if k == "g":
            log.append(torch.zeros(4, ex.theta.numel, dtype=ex.theta.dtype))
        orig_after(k, last)

    def read(views, params) -> None:
        side = 0 if params is ex.theta.params else 1
        tmp = [torch.zeros_like(v) for v in views]
        orig_read(tmp, params)
        for v, t in zip(views, tmp):
            v.add_(t)
        log[-1][2 * side + (kind["now"] == "h")] = torch.cat([t.reshape(-1) for t in tmp])

    ex.after_backward, ex._read = after_backward, read
    return log


def grad_difference(engine, plain, state: dict, batches, reads, world: int) -> torch.Tensor:
    """``world * sum_m |x_m - x'_m|`` ([4, N], whole buffers, in the units of one
    process's buffers, which sum the ranks' gradients) of this step's micro-batch gradients:
    DeepSpeed's (as mdgd reads them, averaged over the ranks) against plain torch's
    backward of the same micro-batches from the same parameters (averaged over the ranks
    the way DeepSpeed averages: one float32 sum, halved). ZeRO-3's module hooks change the
    backward's arithmetic (1-2 ulp measured even on one rank); the test's bound takes the
    difference as measured. Zero on ZeRO-2."""
    params = dict(plain.model.named_parameters())
    flat, lo = state["params"], 0
    with torch.no_grad():
        for name in plain.param_names:
            q = params[name]
            q.copy_(flat[lo : lo + q.numel()].view(q.shape).to(q.dtype))
            lo += q.numel()
    n = engine.exchange.numels
    ranges = engine.exchange.local_ranges
    total = torch.zeros(4, sum(n), dtype=torch.float64)
    for batch, ds_x in zip(batches, reads):
        plain.backward(batch)
        x = torch.stack(_buffers(plain))
        plain.compute_direction()  # one micro-batch per accumulation: x is its gradient
        dist.all_reduce(x)
        x /= world
        if ranges is None:
            total += (ds_x.double() - x.double()).abs()
            continue
        mine = torch.zeros_like(total)  # ZeRO-3: this rank's partitions; the others add theirs
        start = local = 0
        for size, (a, b) in zip(n, ranges):
            mine[:, start + a : start + b] = (
                ds_x[:, local : local + b - a].double() - x[:, start + a : start + b].double()
            ).abs()
            start, local = start + size, local + b - a
        dist.all_reduce(mine)
        total += mine
    return total * world  # the one-process buffers hold sums over the ranks, not means


def run_case(case, rank: int) -> dict:
    stage, mode, extra, optim, micro, clip = case
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    opt = optimizer_for(optim)([p for p in theta.parameters() if p.requires_grad])
    model, ref_model = deepspeed_models(
        theta, ref if mode != "ft" else None, ds_config(stage, micro, clip), optimizer=opt
    )
    engine = MDGDEngine(model, ref_model, None, mdgd_config(case, pats))
    plain = plain_engine(case, pats)
    reads = record_reads(engine)
    names = engine.param_names
    figures, states, diffs = [], [capture(engine, names)], []
    for step in range(STEPS):
        reads.clear()
        batches = [batch_for(theta.config, rank, step, m, TEXT_ONLY) for m in range(micro)]
        for m, batch in enumerate(batches):
            engine.backward(batch, last=m == micro - 1)
        world = dist.get_world_size()
        diffs.append(grad_difference(engine, plain, states[-1], batches, list(reads), world))
        figures.append(engine.step())
        states.append(capture(engine, names))
    out = {"states": states, "figures": figures, "grad_diff": diffs}
    if ref_model is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        fresh = dict(models()[1].named_parameters())
        same = True
        for n, q in ref_model.module.named_parameters():
            whole = safe_get_full_fp32_param(q) if q.requires_grad else None
            if whole is None:  # frozen: gather the model's own copy
                import deepspeed

                with deepspeed.zero.GatheredParameters([q]):
                    whole = q.detach().clone()
            same &= torch.equal(whole.view(fresh[n].shape), fresh[n].detach())
        out["ref_same"] = same
    fgs = [engine.theta] + ([engine.phi] if engine.phi is not None else [])
    out["buffer_bytes"] = sum(
        b.numel() * b.element_size() for fg in fgs for b in fg.buffers.values()
    )
    out["global_trainable"] = sum(engine.exchange.numels)
    return out


def scenario_steps(rank: int, world: int, out: str) -> None:
    only = os.environ.get("MDGD_DS_CASES")
    results = {}
    for case in CASES:
        key = case_id(case)
        if only and key not in only.split(","):
            continue
        results[key] = run_case(case, rank)
    torch.save(results, os.path.join(out, f"steps-{rank}.pt"))


def scenario_ckpt(rank: int, world: int, out: str) -> None:
    """ZeRO-3 and ZeRO-2, "mdgd" with AdamW and a scheduler: 2 steps, a checkpoint, 2 more;
    then fresh engines load the checkpoint and run the last 2 steps."""
    results = {}
    for stage in (3, 2):
        case = (stage, "mdgd", {}, "adamw", 2, True)

        def build(stage=stage, case=case):
            theta, ref = models()
            pats = patterns(theta)
            mark_trainable(theta, pats)
            opt = optimizer_for("adamw")([p for p in theta.parameters() if p.requires_grad])
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
            model, ref_model = deepspeed_models(
                theta, ref, ds_config(stage, 2, True), optimizer=opt, lr_scheduler=sched
            )
            return theta, MDGDEngine(model, ref_model, None, mdgd_config(case, pats))

        def run(theta, engine, steps):
            figs = []
            for step in steps:
                for m in range(2):
                    engine.backward(batch_for(theta.config, rank, step, m), last=m == 1)
                figs.append(engine.step())
            return figs, capture(engine, engine.param_names)

        path = os.path.join(out, f"ckpt-zero{stage}")
        theta, engine = build()
        run(theta, engine, range(2))
        engine.save_checkpoint(path)
        figs, full = run(theta, engine, range(2, 4))
        theta, engine = build()
        engine.load_checkpoint(path)
        step_count = engine.step_count
        figs2, resumed = run(theta, engine, range(2, 4))
        results[stage] = {
            "full": full,
            "resumed": resumed,
            "figures": (figs, figs2),
            "step_count": step_count,
            "files": sorted(os.listdir(path)),
        }
    torch.save(results, os.path.join(out, f"ckpt-{rank}.pt"))


def scenario_faults(rank: int, world: int, out: str) -> None:
    """ZeRO-3 and ZeRO-2, ``nonfinite`` "skip" and "raise": rank 1's gradients only get a
    NaN (or its loss only is NaN; ``dist_faults.poison``); every rank must skip (or
    raise), leave the parameters unchanged and go on stepping together."""
    from dist_faults import run_fault

    results = {}
    for stage in (3, 2):
        for nonfinite in ("skip", "raise"):
            for fault in ("grad", "loss"):
                theta, ref = models()
                pats = patterns(theta)
                mark_trainable(theta, pats)
                opt = optimizer_for("adamw")([p for p in theta.parameters() if p.requires_grad])
                model, ref_model = deepspeed_models(
                    theta, ref, ds_config(stage, 1, False), optimizer=opt
                )
                cfg = MDGDConfig(trainable=pats, nonfinite=nonfinite, dist_timeout_s=60)
                engine = MDGDEngine(model, ref_model, None, cfg)
                res = run_fault(
                    theta, engine, rank, fault, lambda e: capture(e, e.param_names)["params"]
                )
                results[stage, nonfinite, fault] = res
    torch.save(results, os.path.join(out, f"faults-{rank}.pt"))


DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def llava_config(stage: int) -> dict:
    """The text of LLaVA's own scripts/zero{stage}.json (haotian-liu/LLaVA), "auto" and all."""
    with open(os.path.join(DATA, f"llava_zero{stage}.json")) as f:
        return json.load(f)


def scenario_trainer(rank: int, world: int, out: str) -> None:
    """MDGDTrainer in "dp" mode and under LLaVA's zero3.json and zero2.json (3 steps of 2
    micro-batches, a checkpoint at step 2), then the ZeRO-3 run resumed from it."""
    from dist_worker import Examples, full_flat
    from llava_tiny import trainer_args
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from mdgd.integrations.hf import MDGDTrainer

    def train(name: str, ds: dict | None, resume: str | None = None):
        # the models first: TrainingArguments with a ZeRO-3 config make transformers build
        # every later model partitioned (zero.Init), as from_pretrained does in a LLaVA run
        theta, ref = models()
        args = trainer_args(
            os.path.join(out, name),
            learning_rate=1e-2,
            max_grad_norm=1.0,  # LLaVA's files leave "gradient_clipping" at DeepSpeed's 1.0
            adam_epsilon=1e-4,  # see dist_worker.optimizer_for
            max_steps=3,
            save_strategy="steps",
            save_steps=2,
            ddp_backend="gloo",
            ddp_timeout=60,
            deepspeed=ds,
        )
        cfg = MDGDConfig(mode="mdgd", trainable=patterns(theta), dist_timeout_s=60)
        trainer = MDGDTrainer(
            model=theta,
            ref_model=ref,
            mdgd_config=cfg,
            args=args,
            train_dataset=Examples(theta.config, 16),
        )
        trainer.train(resume_from_checkpoint=resume)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        engine = trainer.engine
        if ds is None:
            flat = full_flat(theta, engine.param_names)
        else:
            from deepspeed.utils import safe_get_full_fp32_param

            flat = torch.cat(
                [safe_get_full_fp32_param(p).reshape(-1).double() for p in engine.theta.params]
            )
        trainer.save_model(os.path.join(out, name, "final"))
        unset_hf_deepspeed_config()  # this run's config must not shape the next run's models
        return {
            "logs": logs,
            "params": flat,
            "mode": engine.distributed,
            "names": engine.param_names,
        }

    result = {"dp": train("dp", None)}
    for stage in (3, 2):
        result[f"zero{stage}"] = train(f"zero{stage}", llava_config(stage))
    ckpt = os.path.join(out, "zero3", "checkpoint-2")
    result["resumed"] = train("resumed", llava_config(3), ckpt)
    result["files"] = sorted(os.listdir(ckpt))
    torch.save(result, os.path.join(out, f"trainer-{rank}.pt"))


SCENARIOS = {
    "steps": scenario_steps,
    "trainer": scenario_trainer,
    "ckpt": scenario_ckpt,
    "faults": scenario_faults,
}


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    # a hang (a collective one rank never reaches) prints every thread's stack and exits
    # instead of waiting for the launch's timeout with nothing to show
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("MDGD_DS_HANG_S", 600)), exit=True)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    SCENARIOS[scenario](rank, world, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
