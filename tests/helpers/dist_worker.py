"""One rank of a multi-process test, launched by tests/test_distributed.py.

    RANK=r WORLD_SIZE=w MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tests/helpers/dist_worker.py SCENARIO OUT

torchrun sets the same variables. Scenarios:

* ``steps``: every case of :data:`CASES` (mode x distributed mode), 3 steps on this
  rank's batches; saves the state before each step and after the last
  (``step_check.capture``) and the figures to ``OUT/steps-<rank>.pt``.
* ``bad``: configurations on which the ranks disagree, one after another; each
  must raise a ValueError on every rank; the messages go to ``OUT/bad-<rank>.json``.
* ``timeout`` / ``timeout_fsdp``: rank 1 never builds its engine; rank 0 must raise
  within the timeout.
* ``trainer``: MDGDTrainer for 3 steps with the process group made by the
  TrainingArguments (accelerate), as under ``torchrun``; ``OUT/trainer-<rank>.pt``.
* ``fsdp``: every case of :data:`FSDP_CASES` under FSDP2 (the state before each step),
  the one-process reference of each step from that state (half the cases on each rank)
  and where the gradients live; ``OUT/fsdp-<rank>.pt``.
* ``fsdp_bad``: models wrapped differently (a ValueError on every rank), then
  theta prepared the way accelerate's FSDP2 plugin does and phi by ``shard_like``.
* ``fsdp_ckpt``: checkpoint and resume under FSDP2 against the uninterrupted run.
* ``trainer_fsdp``: MDGDTrainer in "dp" and "fsdp" mode, and resumed on FSDP2.
* ``faults``, ``dies_dp``, ``dies_fsdp``: NaN on one rank and a rank dying mid-step
  (tests/helpers/dist_faults.py).
"""

from __future__ import annotations

import copy
import datetime
import functools
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch import run_rank  # noqa: E402
from llava_tiny import (  # noqa: E402
    Examples,
    checkpoint_activations,
    perturbed_copy,
    random_batch,
    text_only_batch,
    tiny_llava,
    trainer_args,
)
from step_check import capture, full_flat, reference_step  # noqa: E402

from mdgd import (  # noqa: E402
    ImageTokenHidden,
    MDGDConfig,
    MDGDEngine,
    llava_trainable_patterns,
    mark_trainable,
    shard_models,
)

STEPS = 3
LR = 0.5
# (mode, distributed mode, extra config, optimizer)
CASES = [
    ("mdgd", "dp", {}, "sgd"),
    ("mdgd", "dp", {"align": False}, "sgd"),
    ("gm", "dp", {"alpha": 0.3}, "sgd"),
    ("ft", "dp", {}, "sgd"),
    ("mdgd", "dp", {"granularity": "block:700"}, "adamw"),
    ("gm", "dp", {"alpha": 0.4, "granularity": "global"}, "adamw"),
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
    # and FSDP2 shards the norm unevenly (17 + 16)
    return llava_trainable_patterns(model, 2) + [r"vision_tower\..*layers\.0\.layer_norm2\.weight"]


def batch_for(config, rank: int, step: int, micro: int = 0, text_only=()):
    """This rank's micro-batch; text-only (no image) where ``(step, micro)`` is in ``text_only``."""
    seed = 1000 * step + 100 * micro + rank
    if (step, micro) in text_only:
        return text_only_batch(config, batch_size=2, seed=seed)
    return random_batch(config, batch_size=2, seed=seed)


# Under FSDP2 the first micro-batch of step 1 is text-only on every rank (the ranks must
# agree: scenario_fsdp_bad checks the error when they do not)
FSDP_TEXT_ONLY = ((1, 0),)


def optimizer_for(name: str):
    if name == "sgd":
        return lambda params: torch.optim.SGD(params, lr=LR)
    # eps=1e-4 keeps AdamW's step Lipschitz in the gradient: at the default 1e-8 an element
    # whose gradient cancels to ~1e-8 over the micro-batches turns float32 summation-order
    # noise (one process vs ranks) into a visible difference of the step
    return lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, eps=1e-4)


def run_case(case, rank: int, world: int) -> dict:
    """3 steps of one case: the state before each step and after the last
    (``step_check.capture``), the figures, and the number of buckets all-reduced from
    inside a backward ("dp")."""
    mode, dmode, extra, optim = case
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    cfg = MDGDConfig(mode=mode, trainable=pats, distributed=dmode, dist_timeout_s=60, **extra)
    opt = optimizer_for(optim)([p for p in theta.parameters() if p.requires_grad])
    engine = MDGDEngine(theta, ref, opt, cfg)
    figures, states = [], [capture(engine, theta)]
    for step in range(STEPS):
        figures.append(engine.step(batch_for(theta.config, rank, step)))
        states.append(capture(engine, theta))
    return {"states": states, "figures": figures, "early": engine.exchange.early_buckets}


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

    def dp_and_fsdp():  # rank 0 "dp", rank 1 "fsdp": both check in, on the mode they differ
        t, r = copy.deepcopy(theta), copy.deepcopy(ref)
        mark_trainable(t, pats)
        if rank == 1:
            shard_models(t, r)
        return MDGDEngine(t, r, None, MDGDConfig(trainable=pats, dist_timeout_s=20))

    msgs["dist_mode"] = expect_value_error(dp_and_fsdp)

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
    msgs["no_h_backward"] = run_without_h_backward_on_rank_1(theta, ref, pats, rank)
    with open(os.path.join(out, f"bad-{rank}.json"), "w") as f:
        json.dump(msgs, f)


class NoVisualGraph(ImageTokenHidden):
    """pi(X^v) detached: L_v has no graph, so the engine runs no h backward (as for a
    micro-batch without image tokens)."""

    def __call__(self, model, batch, outputs):
        z, mask = super().__call__(model, batch, outputs)
        return z.detach(), mask


def run_without_h_backward_on_rank_1(theta, ref, pats, rank: int) -> list[float]:
    """dp with small buckets: rank 0's hooks send h buckets mid-backward, rank 1 runs no
    h backward at all; the collectives must still match (no hang) and the ranks agree."""
    t, r = copy.deepcopy(theta), copy.deepcopy(ref)
    mark_trainable(t, pats)
    opt = torch.optim.SGD([p for p in t.parameters() if p.requires_grad], lr=LR)
    cfg = MDGDConfig(trainable=pats, dist_timeout_s=20, dist_bucket_mb=2**-9)
    visual = NoVisualGraph() if rank == 1 else None
    engine = MDGDEngine(t, r, opt, cfg, visual=visual)
    for step in range(2):
        engine.step(batch_for(t.config, rank, step))
    return full_flat(t, engine.param_names).tolist()


def scenario_timeout(rank: int, world: int, out: str, sharded: bool = False) -> None:
    if rank != 0:
        time.sleep(5)  # never builds its engine (rank 0 times out after 2 s)
        return
    theta, ref = models()
    pats = patterns(theta)
    if sharded:
        mark_trainable(theta, pats)
        shard_models(theta, ref)
    t0 = time.monotonic()
    try:
        MDGDEngine(theta, ref, None, MDGDConfig(trainable=pats, dist_timeout_s=2))
        msg = "no error"
    except RuntimeError as e:
        msg = str(e)
    with open(os.path.join(out, "timeout-0.json"), "w") as f:
        json.dump({"message": msg, "seconds": time.monotonic() - t0}, f)


# ---------------------------------------------------------------------- FSDP2

FSDP_MODES = {
    "mdgd": {"mode": "mdgd"},
    "mdgd-noalign": {"mode": "mdgd", "align": False},
    "gm": {"mode": "gm", "alpha": 0.3},
    "ft": {"mode": "ft"},
}
# (mode, granularity, micro-batches per rank, reshard_after_forward, optimizer,
#  HF activation checkpointing, shard the frozen parameters): every combination with
# AdamW and checkpointing on, and a few with SGD (AdamW's update hardly depends on the
# gradient's scale) or with the frozen parameters left replicated
FSDP_CASES = [
    (mode, gran, micro, reshard, "adamw", True, True)
    for mode in FSDP_MODES
    for gran in ("tensor", "block:700")
    for micro in (1, 2)
    for reshard in (True, False)
] + [
    ("mdgd", "tensor", 2, True, "sgd", False, True),
    ("mdgd-noalign", "block:700", 1, False, "sgd", True, True),
    ("gm", "tensor", 2, False, "sgd", False, True),
    ("ft", "block:700", 2, True, "sgd", False, True),
    ("mdgd", "tensor", 2, True, "sgd", True, False),
    ("gm", "block:700", 1, False, "adamw", False, False),
]


def fsdp_case_id(case) -> str:
    mode, gran, micro, reshard, optim, ckpt, frozen = case
    key = f"{mode}-{gran}-micro{micro}-reshard{int(reshard)}-{optim}-ckpt{int(ckpt)}"
    return key if frozen else key + "-frozen_replicated"


def build_fsdp_case(case, sharded: bool):
    """theta, phi and the engine of one FSDP2 case (``sharded=False``: one process)."""
    mode, gran, micro, reshard, optim, ckpt, frozen = case
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    if ckpt:
        checkpoint_activations(theta)
    if sharded:
        shard_models(theta, ref, reshard_after_forward=reshard, shard_frozen=frozen)
    opt = optimizer_for(optim)([p for p in theta.parameters() if p.requires_grad])
    cfg = MDGDConfig(
        trainable=pats,
        granularity=gran,
        distributed="fsdp" if sharded else "none",
        dist_timeout_s=60,
        **FSDP_MODES[mode],
    )
    return theta, ref, MDGDEngine(theta, ref, opt, cfg)


def run_fsdp_case(case, rank: int, world: int) -> dict:
    """3 steps on this rank's micro-batches: the state before each step and after the
    last (``step_check.capture``), the figures, and whether phi stayed unchanged."""
    micro = case[2]
    theta, ref, engine = build_fsdp_case(case, sharded=True)
    figures, states = [], [capture(engine, theta)]
    for step in range(STEPS):
        for m in range(micro - 1):
            engine.backward(batch_for(theta.config, rank, step, m, FSDP_TEXT_ONLY))
        figures.append(engine.step(batch_for(theta.config, rank, step, micro - 1, FSDP_TEXT_ONLY)))
        states.append(capture(engine, theta))
    fresh = models()[1]
    ref_names = [n for n, _ in fresh.named_parameters()]
    ref_same = torch.equal(full_flat(ref, ref_names), full_flat(fresh, ref_names))
    return {"states": states, "figures": figures, "ref_same": ref_same}


def run_fsdp_reference(case, world: int, states: list[dict]) -> list[dict]:
    """One process, the union of the ranks' micro-batches (world x micro per step), each
    step from the multi-process run's state before it (``step_check.reference_step``)."""
    micro = case[2]
    theta, _, engine = build_fsdp_case(case, sharded=False)
    ranks = [(r, m) for r in range(world) for m in range(micro)]
    return [
        reference_step(
            engine,
            [batch_for(theta.config, r, step, m, FSDP_TEXT_ONLY) for r, m in ranks],
            states[step],
            world=world,
            micro=micro,
            pieces=world,  # each rank sums its shards' pieces, then one all-reduce
        )
        for step in range(STEPS)
    ]


def grad_storage(rank: int) -> dict:
    """Where the gradients live under FSDP2: the engine's buffers hold the local shards
    only, and every .grad of theta and phi is a view into them."""
    case = ("mdgd", "tensor", 2, True, "adamw", False, True)
    theta, ref, engine = build_fsdp_case(case, sharded=True)
    fgs = [engine.theta, engine.phi]
    local = sum(p.to_local().numel() for p in engine.theta.params)
    out = {
        "local_trainable": local,
        "global_trainable": sum(p.numel() for p in engine.theta.params),
        "itemsize": engine.theta.dtype.itemsize,
        "buffer_bytes": sum(
            b.numel() * b.element_size() for fg in fgs for b in fg.buffers.values()
        ),
    }

    def inside(kind: str) -> bool:
        for fg in fgs:
            buf = fg.buffers[kind]
            lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
            for p in fg.params:
                g = p.grad.to_local()
                end = g.data_ptr() + g.numel() * g.element_size()
                if g.numel() and not (lo <= g.data_ptr() and end <= hi):
                    return False
        return True

    engine.backward(batch_for(theta.config, rank, 0, 0))
    out["h_inside"] = inside("h")  # after a backward the .grad are the h views
    engine.backward(batch_for(theta.config, rank, 0, 1), last=True)
    engine.compute_direction()
    engine.phi.point("g")  # phi's .grad are None after the step; look at its g views too
    out["g_inside"] = inside("g")
    trainable = {id(p) for fg in fgs for p in fg.params}
    out["other_grads"] = sum(
        p.grad is not None for m in (theta, ref) for p in m.parameters() if id(p) not in trainable
    )
    return out


def scenario_fsdp(rank: int, world: int, out: str) -> None:
    mine = {fsdp_case_id(c): run_fsdp_case(c, rank, world) for c in FSDP_CASES}
    # the one-process references, split over the ranks, from this rank's states (every
    # rank gathered the same ones)
    refs = {
        fsdp_case_id(c): run_fsdp_reference(c, world, mine[fsdp_case_id(c)]["states"])
        for i, c in enumerate(FSDP_CASES)
        if i % world == rank
    }
    result = {"cases": mine, "refs": refs, "storage": grad_storage(rank)}
    torch.save(result, os.path.join(out, f"fsdp-{rank}.pt"))


def scenario_fsdp_bad(rank: int, world: int, out: str) -> None:
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    msgs = {}

    def build(wrap, cfg_kw=None):
        t, r = copy.deepcopy(theta), copy.deepcopy(ref)
        wrap(t, r)
        return MDGDEngine(
            t, r, None, MDGDConfig(trainable=pats, dist_timeout_s=20, **(cfg_kw or {}))
        )

    def root_only_ref(t, r):  # theta per layer, phi as one unit
        shard_models(t, None)
        fully_shard(r)

    msgs["units"] = expect_value_error(lambda: build(root_only_ref))
    msgs["one_wrapped"] = expect_value_error(lambda: build(lambda t, r: shard_models(t, None)))
    msgs["dp_on_fsdp"] = expect_value_error(
        lambda: build(lambda t, r: shard_models(t, r), {"distributed": "dp"})
    )
    msgs["fsdp_unwrapped"] = expect_value_error(
        lambda: build(lambda t, r: None, {"distributed": "fsdp"})
    )
    # the ranks still agree after all that: a good engine builds and steps
    good = build(lambda t, r: shard_models(t, r))
    # a text-only micro-batch on rank 1 only: refused on both ranks, before any forward
    mixed = batch_for(good.model.config, rank, 0, text_only=((0, 0),) if rank else ())
    msgs["mixed_text_only"] = expect_value_error(lambda: good.backward(mixed))
    good.backward(batch_for(good.model.config, rank, 0), last=True)
    good.compute_direction()
    msgs["good_mode"] = good.distributed
    with open(os.path.join(out, f"fsdp_bad-{rank}.json"), "w") as f:
        json.dump(msgs, f)
    torch.save(run_plugin_wrapped(rank), os.path.join(out, f"plugin-{rank}.pt"))


PLUGIN_CASE = ("mdgd", "tensor", 1, True, "adamw", False, True)


def run_plugin_wrapped(rank: int):
    """PLUGIN_CASE with theta wrapped as accelerate's FSDP2 plugin wraps it in prepare()
    (its own function, on a stand-in accelerator) and phi wrapped like theta."""
    import types

    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from mdgd.distributed import shard_like

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer", "CLIPEncoderLayer"],
    )
    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin),
        torch_device_mesh=None,
        mixed_precision="no",
        device=torch.device("cpu"),
        is_main_process=rank == 0,
    )
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    theta = fsdp2_prepare_model(accelerator, theta)
    shard_like(ref, theta)
    opt = optimizer_for("adamw")([p for p in theta.parameters() if p.requires_grad])
    engine = MDGDEngine(theta, ref, opt, MDGDConfig(trainable=pats, dist_timeout_s=60))
    figures, states = [], [capture(engine, theta)]
    for step in range(STEPS):
        figures.append(engine.step(batch_for(theta.config, rank, step, text_only=FSDP_TEXT_ONLY)))
        states.append(capture(engine, theta))
    units = [n for n, m in theta.named_modules() if type(m).__name__.startswith("FSDP")]
    return states, figures, engine.distributed, units


def scenario_fsdp_ckpt(rank: int, world: int, out: str) -> None:
    """4 steps straight vs 2 steps, checkpoint, a fresh engine, load, 2 more steps."""

    def make():
        ref = tiny_llava(seed=0, vision_hidden=33, heads=1, attention_dropout=0.2)
        theta = perturbed_copy(ref, seed=1)
        theta.train()  # dropout on: the RNG state matters
        pats = patterns(theta)
        mark_trainable(theta, pats)
        shard_models(theta, ref)
        opt = optimizer_for("adamw")([p for p in theta.parameters() if p.requires_grad])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        cfg = MDGDConfig(mode="gm", alpha=0.5, trainable=pats, dist_timeout_s=60)
        return MDGDEngine(theta, ref, opt, cfg, lr_scheduler=sched)

    def run(engine, steps):
        return [engine.step(batch_for(engine.model.config, rank, s)) for s in steps]

    def opt_state(engine):
        return [
            {k: v.to_local().clone() if hasattr(v, "to_local") else v for k, v in st.items()}
            for st in (engine.optimizer.state[p] for p in engine.theta.params)
        ]

    torch.manual_seed(1234 + rank)
    full = make()
    figures_full = run(full, range(4))
    torch.manual_seed(1234 + rank)
    first = make()
    run(first, range(2))
    first.save_checkpoint(os.path.join(out, "ckpt"))
    del first
    torch.manual_seed(999)  # a different RNG state: the checkpoint must restore it
    resumed = make()
    resumed.load_checkpoint(os.path.join(out, "ckpt"))
    step_after_load = resumed.step_count
    figures_resumed = run(resumed, range(2, 4))
    names = full.param_names
    same_opt = all(
        set(a) == set(b)
        and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
        for a, b in zip(opt_state(full), opt_state(resumed))
    )
    torch.save(
        {
            "figures_full": figures_full[2:],
            "figures_resumed": figures_resumed,
            "params_full": full_flat(full.model, names),
            "params_resumed": full_flat(resumed.model, names),
            "same_optimizer_state": same_opt,
            "step_after_load": step_after_load,
            "files": sorted(os.listdir(os.path.join(out, "ckpt"))),
        },
        os.path.join(out, f"fsdp_ckpt-{rank}.pt"),
    )


def make_trainer(args, **config):
    """theta, phi and an MDGDTrainer (mode "mdgd") on 16 examples."""
    from mdgd.integrations.hf import MDGDTrainer

    theta, ref = models()
    cfg = MDGDConfig(mode="mdgd", trainable=patterns(theta), **config)
    trainer = MDGDTrainer(
        model=theta,
        ref_model=ref,
        mdgd_config=cfg,
        args=args,
        train_dataset=Examples(theta.config, 16),
    )
    return theta, ref, trainer


def scenario_trainer(rank: int, world: int, out: str) -> None:

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
    theta, ref, trainer = make_trainer(args, dist_timeout_s=60)
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
            "dist_mode": engine.distributed,
            "wrapped": type(trainer.model_wrapped).__name__,
            "ref_unchanged": ref_same,
        },
        os.path.join(out, f"trainer-{rank}.pt"),
    )


def scenario_trainer_fsdp(rank: int, world: int, out: str) -> None:
    """The Trainer in "dp" and in "fsdp" mode (3 steps, a checkpoint at step 2), then an
    "fsdp" run resumed from that checkpoint."""

    def train(dmode: str, name: str, resume: str | None = None):
        args = trainer_args(
            os.path.join(out, name),
            learning_rate=1e-2,
            max_grad_norm=1.0,
            adam_epsilon=1e-4,  # see optimizer_for
            max_steps=3,
            save_strategy="steps",
            save_steps=2,
            ddp_backend="gloo",
            ddp_timeout=60,
        )
        theta, _, trainer = make_trainer(args, distributed=dmode)
        trainer.train(resume_from_checkpoint=resume)
        logs = [h for h in trainer.state.log_history if "loss" in h]
        flat = full_flat(theta, trainer.engine.param_names)
        return {"logs": logs, "params": flat, "mode": trainer.engine.distributed}

    result = {"dp": train("dp", "dp"), "fsdp": train("fsdp", "fsdp")}
    result["resumed"] = train("fsdp", "resumed", os.path.join(out, "fsdp", "checkpoint-2"))
    result["files"] = sorted(os.listdir(os.path.join(out, "fsdp", "checkpoint-2")))
    torch.save(result, os.path.join(out, f"trainer_fsdp-{rank}.pt"))


SCENARIOS = {
    "steps": scenario_steps,
    "bad": scenario_bad,
    "timeout": scenario_timeout,
    "timeout_fsdp": functools.partial(scenario_timeout, sharded=True),
    "fsdp": scenario_fsdp,
    "fsdp_bad": scenario_fsdp_bad,
    "fsdp_ckpt": scenario_fsdp_ckpt,
    "trainer": scenario_trainer,
    "trainer_fsdp": scenario_trainer_fsdp,
}


def _fault_scenarios() -> dict:
    import dist_faults  # imports this module: registered after its definitions

    return {
        "faults": dist_faults.scenario_faults,
        "dies_dp": functools.partial(dist_faults.scenario_dies, dmode="dp"),
        "dies_fsdp": functools.partial(dist_faults.scenario_dies, dmode="fsdp"),
    }


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)

    def body() -> None:
        if not scenario.startswith("trainer"):  # the Trainer's accelerate state makes its own
            dist.init_process_group(
                "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
            )
        SCENARIOS.update(_fault_scenarios())
        SCENARIOS[scenario](rank, world, out)

    run_rank(body)


if __name__ == "__main__":
    main()
