"""Fault scenarios of tests/dist_worker.py (launched by tests/test_dist_faults.py).

* ``faults``: in ``"dp"`` and ``"fsdp"`` mode, under ``nonfinite="skip"`` and ``"raise"``,
  rank 1's gradients only get a NaN (a hook on the projector's output gradient: the
  loss stays finite) or rank 1's loss only is NaN; every rank must skip (or raise),
  keep identical parameters, and go on stepping together. ``OUT/faults-<rank>.pt``.
* ``dies_dp`` / ``dies_fsdp``: rank 1 dies (``os._exit``) in the middle of a step, after
  a backward; rank 0 must raise within ``dist_timeout_s`` naming the collective
  (``OUT/dies_<mode>-0.json``).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from dist_worker import batch_for, full_flat, models, optimizer_for, patterns

from mdgd import MDGDConfig, MDGDEngine, mark_trainable, shard_models

TIMEOUT_S = 5


def build(dmode: str, **config):
    """theta and an AdamW engine on ``models()`` in ``dmode`` (both models sharded in
    ``"fsdp"``); ``config`` goes to ``MDGDConfig``."""
    theta, ref = models()
    pats = patterns(theta)
    mark_trainable(theta, pats)
    if dmode == "fsdp":
        shard_models(theta, ref)
    opt = optimizer_for("adamw")([p for p in theta.parameters() if p.requires_grad])
    cfg = MDGDConfig(trainable=pats, distributed=dmode, **config)
    return theta, MDGDEngine(theta, ref, opt, cfg)


def projector(model) -> torch.nn.Module:
    return next(m for n, m in model.named_modules() if n.endswith("multi_modal_projector"))


def poison(model, fault: str):
    """A hook that makes rank 1's gradients (or its loss) NaN; returns its handle."""

    def nan_grad(_module, _inputs, output):
        output.register_hook(lambda g: torch.full_like(g, math.nan))

    def nan_loss(_module, _inputs, output):
        return output * math.nan

    return projector(model).register_forward_hook(nan_grad if fault == "grad" else nan_loss)


def one_case(rank: int, dmode: str, nonfinite: str, fault: str) -> dict:
    theta, engine = build(dmode, mode="mdgd", nonfinite=nonfinite, dist_timeout_s=60)
    return run_fault(theta, engine, rank, fault, lambda e: full_flat(theta, e.param_names))


def run_fault(theta, engine, rank: int, fault: str, params) -> dict:
    """A step, then one with rank 1 poisoned (``fault``), then one more; ``params(engine)``
    gives the trainable parameters flat (gathered where the strategy shards them)."""
    engine.step(batch_for(theta.config, rank, 0))
    before = params(engine)
    handle = poison(theta, fault) if rank == 1 else None
    out = {"error": None, "figures": None}
    try:
        out["figures"] = engine.step(batch_for(theta.config, rank, 1))
    except FloatingPointError as e:
        out["error"] = str(e)
    if handle is not None:
        handle.remove()
    out["unchanged"] = torch.equal(params(engine), before)
    engine.step(batch_for(theta.config, rank, 2))  # the ranks still step together
    out["after"] = params(engine)
    return out


def assert_fault_handled(ranks: list[dict], nonfinite: str) -> None:
    """Every rank skipped (or raised) the poisoned step, kept its parameters, and the ranks
    stepped on together, identical."""
    for rank, res in enumerate(ranks):
        if nonfinite == "raise":
            assert res["error"] and "non-finite" in res["error"], f"rank {rank}: {res}"
        else:
            assert res["error"] is None and res["figures"]["skipped"] == 1.0, f"rank {rank}"
        assert res["unchanged"], f"rank {rank} moved its parameters on a non-finite step"
    a, b = (r["after"] for r in ranks)
    assert torch.equal(a, b), "the ranks' parameters differ after the next step"
    assert torch.isfinite(a).all()


def scenario_faults(rank: int, world: int, out: str) -> None:
    results = {}
    for dmode in ("dp", "fsdp"):
        for nonfinite in ("skip", "raise"):
            for fault in ("grad", "loss"):
                results[dmode, nonfinite, fault] = one_case(rank, dmode, nonfinite, fault)
    torch.save(results, os.path.join(out, f"faults-{rank}.pt"))


def scenario_dies(rank: int, world: int, out: str, dmode: str) -> None:
    theta, engine = build(dmode, mode="mdgd", dist_timeout_s=TIMEOUT_S)
    engine.step(batch_for(theta.config, rank, 0))
    engine.backward(batch_for(theta.config, rank, 1))
    if rank == 1:
        os._exit(0)  # dies mid-step: its backward ran, the step's collectives never come
    t0 = time.monotonic()
    try:
        engine.step(batch_for(theta.config, rank, 2))
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    with open(os.path.join(out, f"dies_{dmode}-0.json"), "w") as f:
        json.dump({"message": message, "seconds": time.monotonic() - t0}, f)
