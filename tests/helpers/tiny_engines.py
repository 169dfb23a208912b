"""Tiny MDGD engines shared by the engine, batching, budget, option and checkpoint tests.

engine, theta, ref, theta0, ref0 = build("gm", alpha=0.3)   # SGD lr 1 by default
engine = make_engine("gm")                                  # AdamW + LR scheduler
figures = run_steps(engine, range(2))
"""

from __future__ import annotations

import copy

import torch
from llava_tiny import perturbed_copy, random_batch, tiny_llava, tiny_llava_config

from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns, mark_trainable


def trainable_patterns() -> list[str]:
    """The last two of three language-model layers and the projector."""
    return llava_trainable_patterns(tiny_llava_config(), num_layers=2)


def build(mode="mdgd", dtype=torch.float32, optim="sgd", **kw):
    """(engine, theta, ref, oracle copies) with theta perturbed away from phi."""
    ref = tiny_llava(seed=0, dtype=dtype)
    theta = perturbed_copy(ref, seed=1)
    pats = trainable_patterns()
    mark_trainable(theta, pats)
    params = [p for p in theta.parameters() if p.requires_grad]
    if optim == "sgd":
        opt = torch.optim.SGD(params, lr=1.0)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    cfg = MDGDConfig(mode=mode, trainable=pats, **kw)
    engine = MDGDEngine(theta, ref, opt, cfg)
    return engine, theta, ref, copy.deepcopy(theta), copy.deepcopy(ref)


def flat_params(model, names) -> torch.Tensor:
    p = dict(model.named_parameters())
    return torch.cat([p[n].detach().reshape(-1).double() for n in names])


def assert_update_matches(p0, p1, ref_res, bufs, sizes, dtype):
    """theta_0 - theta_1 == d (SGD, lr = 1), relative to the scale of d's terms."""
    from conftest import TOL, term_scale  # pytest only: the kill-resume worker never calls this

    got = p0 - p1
    scale = term_scale(ref_res, [b.to(dtype) for b in bufs], sizes)
    ulp = p0.abs() * 2.0 ** -(24 if dtype == torch.float32 else 8)
    err = (got - ref_res.direction).abs()
    bad = err > TOL[dtype] * scale + 2 * ulp
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} elements differ; first at "
        f"{torch.nonzero(bad)[:3].flatten().tolist()}: got {got[bad][:3].tolist()} "
        f"want {ref_res.direction[bad][:3].tolist()}"
    )


def make_engine(mode="gm"):
    """Same models, optimizer and scheduler every call; dropout on, so RNG state matters."""
    ref = tiny_llava(seed=0, attention_dropout=0.2)
    theta = perturbed_copy(ref, seed=1)
    theta.train()
    cfg = MDGDConfig(mode=mode, alpha=0.5, trainable=llava_trainable_patterns(ref.config, 2))
    engine = MDGDEngine(theta, ref, None, cfg)
    opt = torch.optim.AdamW([p for p in theta.parameters() if p.requires_grad], lr=1e-2)
    engine.optimizer = opt
    engine.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return engine


def run_steps(engine, steps):
    out = []
    for s in steps:
        engine.backward(random_batch(engine.model.config, seed=100 + 2 * s))
        out.append(engine.step(random_batch(engine.model.config, seed=101 + 2 * s)))
    return out
