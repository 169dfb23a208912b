"""Step benchmark: one training step of a small LLaVA, plain fine-tuning vs MDGD.

    python benchmarks/bench_step.py                 # default small LLaVA, CPU or CUDA
    python benchmarks/bench_step.py --quick         # a smaller one, one round (a smoke test)
    python benchmarks/bench_step.py --text-layers 8 --trainable-layers 8 --batch-size 8

(``mdgd bench step`` runs the same code.)

Rows (each in fresh subprocesses, so that its peak memory is its own; with
``--rounds`` > 1 the rows alternate, so a shared host's noise spreads over all):

* ``ft``: ``MDGDEngine`` in ``mode="ft"``: one forward/backward of theta, the
  optimizer step (what plain fine-tuning costs);
* ``mdgd``: MDGD with the fused op (``mdgd_kernels.mdgd_direction_``, the
  automatic backend: C++ on CPU, Triton/CUDA on GPUs);
* ``gm``: MDGD-GM with the fused op (``mode="gm"``, alpha 0.1 of the elements);
* ``mdgd-per-tensor``: MDGD with the per-tensor reference op a user writes by
  hand (``mdgd_kernels.reference.per_tensor_direction_``, a Python loop of float32
  ``torch.dot``/``add_`` per parameter, a host sync per tensor);
* ``mdgd-recompute``: MDGD that recomputes both forwards for the ``L_v``
  backward instead of retaining the graph of the first backward (the design
  question "retain or recompute?", answered by measurement);
* ``mdgd-dp`` and ``mdgd-fsdp`` (ask for them with ``--modes``): MDGD under
  ``torchrun`` with ``--nproc`` processes (gloo on CPU, NCCL on CUDA), in
  ``distributed="dp"`` (unwrapped models, the four full buffers all-reduced)
  and ``"fsdp"`` (both models sharded by ``mdgd.shard_models``). Each rank runs
  its own batch; the step time is rank 0's, and the row adds each rank's bytes
  of gradient buffers, optimizer state and parameters (local shards of both
  models), and the largest per-rank peak memory.
* ``mdgd-zero2`` and ``mdgd-zero3`` (ask for them with ``--modes``; need DeepSpeed,
  ``DS_ACCELERATOR=cpu`` is set for ``--device cpu``): the same, both models wrapped
  by ``mdgd.deepspeed_models`` (``distributed="deepspeed"``) with ZeRO stage 2 or 3
  (:func:`zero_config`: the client AdamW, no clipping, every parameter partitioned).
  MDGD steps DeepSpeed itself; the optimizer column is DeepSpeed's step. Per rank,
  measured from tensors: mdgd's four buffers (``grads_mb``), DeepSpeed's gradient
  partitions of both engines (``ds_grads_mb``, see :func:`ds_grad_tensors`), theta's
  optimizer state with its fp32 master partitions (``optim_mb`` =
  ``optim_state_mb`` + ``master_mb``), phi's engine's fp32 master partitions
  (``phi_engine_mb``: its optimizer never steps), and the parameters' local bytes
  (``params_mb``: ZeRO-3 each parameter's ``ds_tensor``, ZeRO-2 whole). Tensors
  that share memory (ZeRO-3 in fp32 uses the parameters' partitions as its master
  weights where it can reuse them; DeepSpeed 0.19.8 on CPU keeps a copy) are counted
  once in ``held_mb``; ``held_sum_mb`` adds the categories. All measured between the
  direction's write into ZeRO's partitions and DeepSpeed's step of the last step
  (``ds_grads_after_step_mb``: what stays after it).

``--phi``: how the MDGD rows build phi. ``copy`` (the default): ``copy.deepcopy`` of the
pre-trained model (theta a perturbed copy of it); ``lean``: :func:`mdgd.reference_model`,
which shares theta's frozen modules (theta's trainable parameters are then perturbed);
``copy,lean`` runs both, the lean rows named ``<mode>+lean`` (before and after). Every
row reports ``params_mb`` (both models, each parameter once) and ``phi_shared_mb`` (what
phi shares with theta). ``mdgd-fsdp`` (sharded frozen weights) and the ZeRO rows give phi
its own copies (:func:`mdgd.reference.unshare`), so their lean rows are the copy rows.

Every MDGD row runs two forwards (theta and phi), ``backward(L_vl(theta) +
L_vl(phi))`` into the ``g`` buffers and ``backward(L_v)`` into the ``h`` buffers,
then the op and AdamW. Reported per row: samples/s (batch / median step time),
the median step time with its 20th/80th percentiles, the split of the median
step into forward+backward, direction (op) and optimizer, the op's share of the
step, the peak memory, and ratios against ``ft`` and against the fused ``mdgd``
row.

Memory against docs/distributed.md's formula (one process, ``W = 1``): every row
also reports the bytes it holds for the whole step (the engine's gradient
buffers, the optimizer state, the weights of both models) and the formula's
prediction of them, ``b * (M * P + K * T) + s * T`` for ``b``-byte weights, ``M``
models (2, or 1 for ``ft``), ``K`` gradient buffers (4, or 1 for ``ft``) and ``s``
optimizer bytes per trainable parameter (AdamW on the weights' dtype, no
master copy: ``2b``). The peak minus these bytes is the activations and
workspace.

``--llava-7b``: LLaVA-1.5-7B's widths (CLIP ViT-L/14 at 336 px, 576 image tokens;
Vicuna-7B's 4096/11008 widths, 32 heads, 32,000-word vocabulary) with 2 decoder
layers (``--text-layers``), both trainable with the projector, in bf16 on the GPU.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps;
on CPU the process's peak resident set size (``ru_maxrss``: models, optimizer
state, buffers, activations and the Python/torch runtime, which every row pays
alike). Caveats: CPU timings on a shared machine are noisy (the percentiles
show it); the model is small, so the op is a small share of the step: the op's
own speed is measured by the op benchmark (:mod:`mdgd_bench.ops`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mdgd_bench import results
from mdgd_bench.model import LLAVA_7B, add_size_arguments, size_kwargs
from mdgd_bench.timing import machine, p20_p80, sync, utc_now

# the folder that holds this package: put on the workers' PYTHONPATH so that they import
# this same code, from a checkout's benchmarks/ or from an installed wheel
PACKAGE_PARENT = Path(__file__).resolve().parents[1]

MODES = ("ft", "mdgd", "gm", "mdgd-per-tensor", "mdgd-recompute")
# the engine's mode behind each single-process row
ALGO = {"ft": "ft", "gm": "gm"}
DIST_MODES = {
    "mdgd-dp": "dp",
    "mdgd-fsdp": "fsdp",
    "mdgd-zero2": "deepspeed",
    "mdgd-zero3": "deepspeed",
}
# the ZeRO stage of each DeepSpeed row
ZERO_STAGES = {"mdgd-zero2": 2, "mdgd-zero3": 3}


# ---------------------------------------------------------------------- one row (worker)


def zero_config(stage: int, args: argparse.Namespace) -> dict:
    """The DeepSpeed config of the ``mdgd-zero{stage}`` rows: ZeRO ``stage``, the client
    optimizer (AdamW, as every row), one micro-batch of ``--batch-size`` per step, no
    clipping (DeepSpeed clips at 1.0 unless told), every parameter partitioned."""
    cfg = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,  # the bench runs one micro-batch per step
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }
    if args.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def worker(args: argparse.Namespace) -> dict:
    stage = ZERO_STAGES.get(args.mode)
    if stage and torch.device(args.device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    from mdgd import MDGDConfig, llava_trainable_patterns, mark_trainable, shard_models
    from mdgd.buffers import local_bytes
    from mdgd.reference import reference_model, shared_bytes, unshare
    from mdgd.testing import perturbed_copy, random_batch, tiny_llava
    from mdgd_bench.step_engines import engine_class

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rank, world = 0, 1
    if args.mode in DIST_MODES:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if stage:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend)
        else:
            dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    algo = ALGO.get(args.mode, "mdgd")
    if args.phi == "lean" and algo != "ft":
        # phi shares theta's frozen modules; theta's trainable part then moves away from it
        theta = tiny_llava(seed=0, dtype=dtype, device=device, **size_kwargs(args))
        ref = reference_model(theta, llava_trainable_patterns(theta, args.trainable_layers))
        perturb_trainable(theta, seed=1)
        if stage:  # each DeepSpeed engine partitions its own model: phi needs its own copy
            unshare(ref, theta)
    else:  # phi a deep copy of the pre-trained model, theta that copy perturbed
        ref = tiny_llava(seed=0, dtype=dtype, device=device, **size_kwargs(args))
        theta = perturbed_copy(ref, seed=1)
    if algo == "ft":
        del ref
        ref = None
    patterns = llava_trainable_patterns(theta, args.trainable_layers)
    dmode = DIST_MODES.get(args.mode, "none")
    cfg = MDGDConfig(mode=algo, trainable=patterns, distributed=dmode)
    mark_trainable(theta, patterns)  # before the optimizer is built
    # counted before wrapping: ZeRO-3 leaves empty tensors in the modules
    trainable_numel = sum(p.numel() for p in theta.parameters() if p.requires_grad)
    total_numel = sum(p.numel() for p in theta.parameters())
    if dmode == "fsdp":
        shard_models(theta, ref)
    opt = torch.optim.AdamW([p for p in theta.parameters() if p.requires_grad], lr=1e-5)
    ds_engines = None
    if stage:
        from mdgd import deepspeed_models

        ds_engines = deepspeed_models(theta, ref, zero_config(stage, args), optimizer=opt)
        engine = engine_class(args.mode)(*ds_engines, None, cfg)  # DeepSpeed steps
        theta, ref = ds_engines[0].module, ds_engines[1].module
    else:
        engine = engine_class(args.mode)(theta, ref, opt, cfg)
    batches = [
        random_batch(
            theta.config, args.batch_size, args.text_len, seed=i * world + rank, device=device
        )
        for i in range(4)
    ]
    if dtype != torch.float32:
        for b in batches:
            b["pixel_values"] = b["pixel_values"].to(dtype)

    total, fwd_bwd, direction, optim = [], [], [], []
    zero_row: dict = {}
    last = args.warmup + args.steps - 1
    for i in range(args.warmup + args.steps):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        engine.backward(batch, last=True)
        sync(device)
        t1 = time.perf_counter()
        figures = engine.compute_direction()
        sync(device)
        t2 = time.perf_counter()
        if ds_engines is not None and i == last:
            # the direction now sits in ZeRO's gradient partitions: the most held (untimed)
            zero_row = zero_bytes(engine, ds_engines, stage)
        t2b = time.perf_counter()
        if ds_engines is not None:  # DeepSpeed's step (MDGDEngine.step's own call)
            engine.exchange.optimizer_step(bool(figures["skipped"]))
        else:
            opt.step()
        sync(device)
        t3 = time.perf_counter()
        if i >= args.warmup:
            total.append(t2 - t0 + t3 - t2b)
            fwd_bwd.append(t1 - t0)
            direction.append(t2 - t1)
            optim.append(t3 - t2b)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    row = {
        "mode": args.mode,
        "times": {"step": total, "fwd_bwd": fwd_bwd, "direction": direction, "optimizer": optim},
        "peak_mem_mb": peak / 2**20,
        "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process RSS",
        "trainable_params": trainable_numel,
        "trainable_tensors": len(engine.theta.params),
        "total_params": total_numel,
        "image_tokens": (args.image_size // args.patch_size) ** 2,
    }
    if ds_engines is not None:
        row["zero_stage"] = stage
        row["ds_config"] = zero_config(stage, args)
        row.update(zero_row)
        after = [t for e in ds_engines for ts in ds_grad_tensors(e).values() for t in ts]
        row["ds_grads_after_step_mb"] = tensors_mb(after)
    else:
        row.update(per_rank_bytes(engine, opt))
        # each parameter once: a lean phi's shared ones are theta's (FSDP2 with sharded
        # frozen weights and DeepSpeed give phi its own copies: nothing shared there)
        params = {id(p): p for m in (theta, ref) if m is not None for p in m.parameters()}
        row["params_mb"] = local_bytes(params.values()) / 2**20
    row["phi"] = "none" if ref is None else args.phi
    row["phi_shared_mb"] = shared_bytes(theta, ref) / 2**20 if ref is not None else 0.0
    if dmode == "none":
        row.update(formula_bytes(row, algo, dtype, lean=row["phi"] == "lean"))
        return row
    row["world"] = world
    rows: list[dict] = [{}] * world
    dist.all_gather_object(rows, row)
    dist.destroy_process_group()
    if rank != 0:
        return {}
    keys = ["grads_mb", "optim_mb", "params_mb", "peak_mem_mb"]
    keys += [k for k in ZERO_KEYS if k in row]
    for key in keys:
        row[key] = max(r[key] for r in rows)
        row[f"{key}_per_rank"] = [r[key] for r in rows]
    return row


# the extra per-rank MB of the ZeRO rows (the largest rank's, and each rank's)
ZERO_KEYS = (
    "ds_grads_mb",
    "ds_grads_theta_mb",
    "ds_grads_after_step_mb",
    "optim_state_mb",
    "master_mb",
    "phi_engine_mb",
    "held_mb",
    "held_sum_mb",
)


def tensors_mb(tensors) -> float:
    """MB of the memory the tensors span, each byte once (views of one buffer, or a
    tensor that is another's storage, are not counted twice)."""
    spans = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for t in tensors
        if t is not None and t.numel()
    )
    total, end = 0, -1
    for lo, hi in spans:
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total / 2**20


def ds_grad_tensors(ds_engine) -> dict[str, list[torch.Tensor]]:
    """DeepSpeed's gradient partitions of one engine that its public attributes reach
    (no DeepSpeed API lists them), by attribute: ZeRO-3's ``grad_partitions_flat_buffer``
    (this rank's partitions, allocated at init), ZeRO-1/2's ``grads_in_partition``
    (contiguous gradients, allocated at the first reduction) and ``averaged_gradients``,
    and the ``.grad`` of the fp32 master partitions (:func:`ds_master`). Communication
    buckets (``ipg_buffer``, ``ipg_buckets``) are left out."""
    zopt = ds_engine.optimizer
    out: dict[str, list[torch.Tensor]] = {}
    for name in ("grad_partitions_flat_buffer", "grads_in_partition"):
        t = getattr(zopt, name, None)
        if torch.is_tensor(t):
            out[name] = [t]
    avg = getattr(zopt, "averaged_gradients", None) or {}
    for v in avg.values() if isinstance(avg, dict) else avg:
        got = [x for x in (v if isinstance(v, (list, tuple)) else [v]) if torch.is_tensor(x)]
        out.setdefault("averaged_gradients", []).extend(got)
    grads = [p.grad for p in ds_master(ds_engine) if p.grad is not None]
    if grads:
        out["master.grad"] = grads
    return {k: v for k, v in out.items() if v}


def ds_master(ds_engine) -> list[torch.Tensor]:
    """The fp32 master partitions of one engine: ZeRO-3's ``fp32_partitioned_groups_flat``
    (its inner optimizer holds them only during the step), ZeRO-1/2's
    ``single_partition_of_fp32_groups``, and the inner optimizer's ``param_groups``."""
    zopt = ds_engine.optimizer
    out = [p for g in zopt.optimizer.param_groups for p in g["params"]]
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        out += [t for t in getattr(zopt, name, None) or [] if torch.is_tensor(t)]
    return out


def ds_grads_mb(ds_engines) -> dict:
    """The MB of :func:`ds_grad_tensors` of both engines, of theta's, and where they were."""
    found = [ds_grad_tensors(e) for e in ds_engines]
    return {
        "ds_grads_mb": tensors_mb(t for f in found for ts in f.values() for t in ts),
        "ds_grads_theta_mb": tensors_mb(t for ts in found[0].values() for t in ts),
        "ds_grads_attrs": {
            k: tensors_mb(found[0][k])
            for k in found[0]  # theta's engine, by attribute
        },
    }


def zero_bytes(engine, ds_engines, stage: int) -> dict[str, float]:
    """This rank's MB under DeepSpeed (see the module docstring), from the tensors; called
    between the direction's write into ZeRO's gradient partitions and DeepSpeed's step."""
    ds_theta, ds_phi = ds_engines
    grads = [b for fg in (engine.theta, engine.phi) if fg for b in fg.buffers.values()]
    inner = ds_theta.optimizer.optimizer  # the client AdamW, over the fp32 partitions
    state = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v)]
    master = ds_master(ds_theta)
    phi_inner = ds_phi.optimizer.optimizer  # SGD(lr=0), never steps
    phi = ds_master(ds_phi)
    phi += [v for st in phi_inner.state.values() for v in st.values() if torch.is_tensor(v)]
    params = [p.ds_tensor if stage == 3 else p for e in ds_engines for p in e.module.parameters()]
    ds_grads = [t for e in ds_engines for ts in ds_grad_tensors(e).values() for t in ts]
    parts = {
        "grads_mb": tensors_mb(grads),
        "optim_state_mb": tensors_mb(state),
        "master_mb": tensors_mb(master),
        "optim_mb": tensors_mb(state + master),
        "phi_engine_mb": tensors_mb(phi),
        "params_mb": tensors_mb(params),
        **ds_grads_mb(ds_engines),
    }
    parts["held_mb"] = tensors_mb(grads + state + master + phi + params + ds_grads)
    parts["held_sum_mb"] = sum(
        parts[k] for k in ("grads_mb", "ds_grads_mb", "optim_mb", "phi_engine_mb", "params_mb")
    )
    return parts


def per_rank_bytes(engine, opt) -> dict[str, float]:
    """This rank's MB of gradient buffers, optimizer state and parameters (local shards of
    both models): :func:`mdgd.buffers.held_bytes`, which ``mdgd train``'s summary reports."""
    from mdgd.buffers import held_bytes

    held = held_bytes(engine, opt)
    return {
        "grads_mb": held["grad_buffers"] / 2**20,
        "optim_mb": held["optimizer"] / 2**20,
        "params_mb": held["params"] / 2**20,
    }


def formula_bytes(
    row: dict, algo: str, dtype: torch.dtype, *, lean: bool = False
) -> dict[str, float]:
    """docs/distributed.md's memory formula at W = 1 for this row (see the module docstring),
    in MB, beside the held bytes it predicts and the peak's remainder (activations).
    ``lean``: phi shares theta's frozen weights, its own are the trainable ``T``."""
    b = torch.tensor([], dtype=dtype).element_size()
    models, buffers = (1, 1) if algo == "ft" else (2, 4)
    p, t = row["total_params"], row["trainable_params"]
    weights = p + t if lean and algo != "ft" else models * p
    formula = (b * (weights + buffers * t) + 2 * b * t) / 2**20
    held = row["grads_mb"] + row["optim_mb"] + row["params_mb"]
    return {
        "formula_mb": formula,
        "held_mb": held,
        "activations_mb": row["peak_mem_mb"] - held,
    }


@torch.no_grad()
def perturb_trainable(model, seed: int, scale: float = 0.02) -> None:
    """Move ``model``'s trainable parameters away from phi's (as training would), so that
    ``L_v`` is not 0; noise drawn on each parameter's device."""
    gens: dict[torch.device, torch.Generator] = {}
    for p in model.parameters():
        if p.requires_grad:
            gen = gens.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32, device=p.device)
            p.add_(noise.to(p.dtype) * scale)


def summarise(runs: list[dict], batch_size: int) -> dict:
    """One row from the runs of one mode: medians over all their timed steps."""
    times = {k: [t for r in runs for t in r["times"][k]] for k in runs[0]["times"]}
    med = statistics.median(times["step"])
    p20, p80 = p20_p80(times["step"])
    row = {k: v for k, v in runs[0].items() if k != "times"}
    row.update(
        samples_per_s=batch_size / med,
        step_ms=1e3 * med,
        step_ms_p20=1e3 * p20,
        step_ms_p80=1e3 * p80,
        fwd_bwd_ms=1e3 * statistics.median(times["fwd_bwd"]),
        direction_ms=1e3 * statistics.median(times["direction"]),
        op_share=statistics.median(times["direction"]) / med,
        optimizer_ms=1e3 * statistics.median(times["optimizer"]),
        peak_mem_mb=max(r["peak_mem_mb"] for r in runs),
        steps_timed=len(times["step"]),
        step_ms_all=[1e3 * t for t in times["step"]],
    )
    return row


# ---------------------------------------------------------------------- driver


def table(rows: list[dict]) -> str:
    by = {r["mode"]: r for r in rows}
    head = [
        "mode",
        "samples/s",
        "step ms (p20-p80)",
        "fwd+bwd ms",
        "direction ms",
        "op share",
        "optim ms",
        "peak MB",
        "vs ft",
        "vs fused",
    ]
    body = []
    for r in rows:
        vs_ft = by["ft"]["step_ms"] / r["step_ms"] if "ft" in by else math.nan
        vs_fused = by["mdgd"]["step_ms"] / r["step_ms"] if "mdgd" in by else math.nan
        body.append(
            [
                r["mode"],
                f"{r['samples_per_s']:.2f}",
                f"{r['step_ms']:.1f} ({r['step_ms_p20']:.1f}-{r['step_ms_p80']:.1f})",
                f"{r['fwd_bwd_ms']:.1f}",
                f"{r['direction_ms']:.2f}",
                f"{r['op_share']:.1%}",
                f"{r['optimizer_ms']:.2f}",
                f"{r['peak_mem_mb']:.0f}",
                f"{vs_ft:.2f}x",
                f"{vs_fused:.2f}x",
            ]
        )
    return format_table(head, body)


def format_table(head: list[str], body: list[list[str]]) -> str:
    """Columns padded to their widest cell, the first left-aligned, a rule under the head."""
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [head, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def formula_table(rows: list[dict]) -> str:
    """Single-process rows: the formula's bytes against the held bytes and the peak."""
    head = ["mode", "params MB", "phi shared MB", "formula MB", "held MB", "peak MB"]
    head.append("peak - held MB")
    body = [
        [
            r["mode"],
            f"{r['params_mb']:.1f}",
            f"{r.get('phi_shared_mb', 0.0):.1f}",
            f"{r['formula_mb']:.0f}",
            f"{r['held_mb']:.0f}",
            f"{r['peak_mem_mb']:.0f}",
            f"{r['activations_mb']:.0f}",
        ]
        for r in rows
    ]
    return format_table(head, body)


def memory_table(rows: list[dict]) -> str:
    """Per-rank bytes of the distributed rows (the largest rank's); the DeepSpeed columns
    ("-" on the other rows): its gradient partitions and phi's engine's master weights."""
    head = ["mode", "ranks", "grads MB/rank", "DS grads MB/rank", "optim MB/rank"]
    head += ["phi engine MB/rank", "params MB/rank", "peak MB/rank"]

    def cell(r: dict, key: str) -> str:
        return f"{r[key]:.2f}" if key in r else "-"

    body = [
        [
            r["mode"],
            str(r["world"]),
            cell(r, "grads_mb"),
            cell(r, "ds_grads_mb"),
            cell(r, "optim_mb"),
            cell(r, "phi_engine_mb"),
            cell(r, "params_mb"),
            f"{r['peak_mem_mb']:.0f}",
        ]
        for r in rows
    ]
    return format_table(head, body)


# --quick: a model about a tenth of the default, one round of few steps (under a minute
# of CPU time per row on two cores); options given explicitly still win
QUICK = dict(
    steps=4,
    rounds=1,
    warmup=2,
    batch_size=2,
    text_len=32,
    image_size=32,
    vision_hidden=64,
    text_hidden=128,
    text_layers=2,
    trainable_layers=2,
)

# --llava-7b: LLaVA-1.5-7B's widths with 2 decoder layers, both trainable with the
# projector, bf16, one round (a GPU configuration: about 1B parameters, 0.4B trainable)
LLAVA_7B_RUN = dict(
    LLAVA_7B,
    text_layers=2,
    trainable_layers=2,
    dtype="bf16",
    batch_size=8,
    text_len=448,
    rounds=1,
    steps=5,
    warmup=2,
)


def parse(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, from {', '.join(MODES)} (one process each; the default) and "
        f"the multi-process rows {', '.join(DIST_MODES)} (--nproc ranks under torchrun: "
        "distributed='dp', FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 through mdgd.deepspeed_models, "
        "which need deepspeed installed)",
    )
    p.add_argument("--steps", type=int, default=6, help="timed steps per row and round")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per row, alternated")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--text-len", type=int, default=64, help="text tokens after the image")
    add_size_arguments(p)
    p.add_argument("--trainable-layers", type=int, default=4, help="last N text layers + projector")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument(
        "--phi",
        default="copy",
        help="how the MDGD rows build phi: copy (copy.deepcopy, the default), lean "
        "(mdgd.reference_model: theta's frozen modules shared), or copy,lean for both, the "
        "lean rows named <mode>+lean",
    )
    p.add_argument(
        "--nproc", type=int, default=2, help="processes of the mdgd-dp/fsdp/zero2/zero3 rows"
    )
    quick = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a small configuration for smoke tests: {quick} (options given explicitly win)",
    )
    p.add_argument(
        "--llava-7b",
        action="store_true",
        help="LLaVA-1.5-7B's widths (336 px ViT-L/14 tower, 4096/11008 Llama layers, "
        "32,000 words) with 2 decoder layers, bf16, batch 8 of 448 text tokens "
        "(options given explicitly win)",
    )
    results.add_arguments(p)
    p.add_argument("--mode", help=argparse.SUPPRESS)  # worker
    args = p.parse_args(argv)
    if args.quick and args.llava_7b:
        p.error("--quick and --llava-7b choose two different models: give one")
    preset = QUICK if args.quick else LLAVA_7B_RUN if args.llava_7b else None
    if preset:  # parse again over the preset's defaults, so that explicit options win
        p.set_defaults(**preset)
        args = p.parse_args(argv)
    return args


def worker_command(mode: str, nproc: int, argv: list[str]) -> list[str]:
    """The command that runs one row: this module, under torchrun for the distributed rows."""
    run = ["-m", "mdgd_bench.step", *argv, "--mode", mode]
    if mode in DIST_MODES:
        # torchrun's parser scans the script's arguments too, and refuses "--nproc" as an
        # ambiguous abbreviation of its --nproc-per-node: the workers do not need it
        run = ["-m", "mdgd_bench.step", *without_option(argv, "--nproc"), "--mode", mode]
        # --standalone: a free port, so that concurrent launches do not collide
        run = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *run]
    return [sys.executable, *run]


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` less ``name VALUE`` and ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def run_worker(mode: str, nproc: int, argv: list[str]) -> dict:
    """One row in fresh processes. They run in the folder that holds this package, so that
    ``-m mdgd_bench.step`` is this code whatever the caller's working directory (the
    caller's PYTHONPATH, made absolute, still decides which mdgd they import)."""
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(os.path.abspath(p) for p in paths if p)}
    cmd = worker_command(mode, nproc, argv)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=PACKAGE_PARENT, env=env)
    if out.returncode != 0:
        raise SystemExit(f"row {mode} failed:\n{out.stderr[-4000:]}")
    # the row is rank 0's last line that is a JSON object (DeepSpeed logs to stdout too)
    return json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])


def main(argv: list[str] | None = None, prog: str | None = None) -> list[dict]:
    """Run the step benchmark (``argv`` as on the command line), print it, save the JSON."""
    args = parse(argv, prog)
    if args.mode:  # worker process: one row as JSON on stdout (rank 0 only)
        row = worker(args)
        if row:
            print(json.dumps(row), flush=True)
        if args.mode in DIST_MODES:
            # Skip interpreter finalization: a gloo worker thread can still be releasing the
            # last collective's tensors, and taking the GIL during finalization aborts the
            # process ("terminate called without an active exception"). Once a Hugging Face
            # model is built, destroy_process_group does not join those threads.
            sys.stderr.flush()
            os._exit(0)
        return []
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES and m not in DIST_MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {MODES + tuple(DIST_MODES)}")
    phis = [x.strip() for x in args.phi.split(",") if x.strip()]
    if not phis or set(phis) - {"copy", "lean"}:
        raise SystemExit(f"--phi {args.phi!r}: give copy, lean or copy,lean")
    started = utc_now()
    base = list(argv if argv is not None else sys.argv[1:])
    # one row per mode and phi (ft has no phi): label -> (mode, phi)
    labels = {
        (mode if phi == "copy" or mode == "ft" else f"{mode}+lean"): (mode, phi)
        for mode in modes
        for phi in phis
    }
    runs: dict[str, list[dict]] = {label: [] for label in labels}
    for r in range(args.rounds):  # rounds alternate the rows, spreading a shared host's noise
        for label, (mode, phi) in labels.items():
            runs[label].append(run_worker(mode, args.nproc, [*base, "--phi", phi]))
            print(f"  round {r + 1}/{args.rounds} {label}: done", file=sys.stderr)
    rows = [dict(summarise(runs[label], args.batch_size), mode=label) for label in labels]
    host = machine(torch.device(args.device), started)  # device, cpu, gpu, threads, commit
    if args.threads:
        host["threads"] = args.threads
    r0 = rows[0]
    print(
        f"small LLaVA: {r0['total_params'] / 1e6:.2f}M parameters, "
        f"{r0['trainable_params'] / 1e6:.2f}M trainable in {r0['trainable_tensors']} tensors, "
        f"{r0['image_tokens']} image tokens, batch {args.batch_size}, {args.dtype}; "
        f"{host.get('gpu', host['cpu'])}, {host['cores']} cores, "
        f"{host['threads']} threads"
    )
    print(table(rows))
    if any("formula_mb" in r for r in rows):
        print(formula_table([r for r in rows if "formula_mb" in r]))
    if any("world" in r for r in rows):
        print(memory_table([r for r in rows if "world" in r]))
    record = {
        "benchmark": "step",
        "machine": host,
        "args": {k: v for k, v in vars(args).items() if k != "mode"},
        "rows": rows,
    }
    results.save(
        record, args, benchmark="step", device=args.device, dtype=args.dtype, started=started
    )
    return rows


if __name__ == "__main__":
    main()
