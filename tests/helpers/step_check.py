"""Every step of a multi-process run against one process's step from the same state.

Not a test file. The multi-process run records its state before and after each step
(:func:`capture`: the gathered trainable parameters and optimizer moments, and the
MDGD-GM mask); the one-process reference loads each recorded state (:func:`load`),
runs that step on the union of the ranks' micro-batches (:func:`reference_step`) and
records what the bound needs; :func:`assert_step_matches` then checks the run's next
state against it within tolerances.py's bound. Starting every reference step from the
run's own state takes the gradient's dependence on earlier differences out of the
comparison (no rounding count bounds it), and checking the moments too makes the
chain of steps complete: a wrong moment would show at the step that wrote it.

    states = [capture(engine, theta), ...]              # the run: before step 0, after each
    ref = reference_step(engine, batches, state, world=2, micro=1, pieces=2)
    assert_step_matches("case step 0", states[0], states[1], ref)
"""

from __future__ import annotations

import torch
from tolerances import (
    U32,
    accumulation_roundings,
    adamw_step_noise,
    assert_within,
    buffer_noise,
    coefficient_noise,
    cos_bound,
    direction_noise,
    parameter_bound,
    sgd_step_noise,
    stats_roundoff,
)

MOMENTS = ("exp_avg", "exp_avg_sq")


def full_flat(model, names) -> torch.Tensor:
    """The named parameters, gathered whole (a collective under FSDP2), flat float64."""
    params = dict(model.named_parameters())
    return torch.cat([_whole(params[n]).detach().reshape(-1).double() for n in names])


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def capture(engine, model) -> dict:
    """The state the next step starts from: trainable parameters (flat float64 of the
    float32 values), the optimizer's moments per parameter (gathered, float32) and the
    last step's MDGD-GM mask. Under FSDP2 every rank must call it (it gathers)."""
    names = engine.param_names
    params = dict(model.named_parameters())
    moments = {}
    for n in names:
        st = engine.optimizer.state.get(params[n], {})
        if st:
            moments[n] = {k: _whole(st[k]).detach().clone() for k in MOMENTS if k in st}
            moments[n]["step"] = float(st["step"])
    res = engine.last_result
    return {
        "params": full_flat(model, names),
        "moments": moments,
        "mask": None if res is None else res.mask.cpu().clone(),
    }


def load(engine, model, state: dict) -> None:
    """Put ``state`` (from :func:`capture`) into a one-process engine's model and optimizer."""
    names = engine.param_names
    params = dict(model.named_parameters())
    flat = state["params"]
    lo = 0
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.copy_(flat[lo : lo + p.numel()].view(p.shape).to(p.dtype))
            lo += p.numel()
    opt = engine.optimizer
    opt.state.clear()
    for n, st in state["moments"].items():
        opt.state[params[n]] = {
            k: v.clone().view(params[n].shape) for k, v in st.items() if k != "step"
        }
        opt.state[params[n]]["step"] = torch.tensor(st["step"])


def flat_moments(state: dict, numels: dict[str, int]) -> dict[str, torch.Tensor]:
    """``exp_avg``, ``exp_avg_sq`` and the per-element step count of ``state``, flat
    float64 in the order of ``numels`` (parameter name: elements), zeros where a
    parameter has no state yet."""
    out = {k: [] for k in (*MOMENTS, "step")}
    for n, size in numels.items():
        st = state["moments"].get(n, {})
        for k in MOMENTS:
            v = st.get(k)
            out[k].append(
                torch.zeros(size, dtype=torch.float64) if v is None else v.reshape(-1).double()
            )
        out["step"].append(torch.full((size,), st.get("step", 0.0), dtype=torch.float64))
    return {k: torch.cat(v) for k, v in out.items()}


def _buffers(engine) -> list[torch.Tensor]:
    """gt, ht, gp, hp (zeros for the ones a mode does not keep)."""
    out = []
    for side in (engine.theta, engine.phi):
        for kind in ("g", "h"):
            bufs = side.buffers if side is not None else {}
            out.append(bufs[kind] if kind in bufs else None)
    n = out[0].numel()
    return [b if b is not None else torch.zeros(n, dtype=out[0].dtype) for b in out]


def _direction(engine) -> torch.Tensor:
    """The gradient the optimizer is about to apply (zeros where ``.grad`` is None)."""
    params = dict(engine.model.named_parameters())
    parts = []
    for n in engine.param_names:
        g = params[n].grad
        parts.append(
            torch.zeros(params[n].numel(), dtype=torch.float64)
            if g is None
            else g.detach().reshape(-1).double()
        )
    return torch.cat(parts)


def reference_step(
    engine,
    batches,
    state: dict,
    *,
    world: int,
    micro: int,
    pieces: int,
    grad_diff: torch.Tensor | None = None,
) -> dict:
    """One step of the one-process ``engine`` from ``state`` on ``batches`` (the ranks'
    micro-batches, in rank order), with what the bound needs.

    ``world`` and ``micro`` are the multi-process run's ranks and micro-batches per rank
    (its accumulation order); ``pieces`` is the number of partial sums each segment's
    statistics are added from there (the ranks under FSDP2, 1 when every rank computes
    them from whole buffers).

    ``grad_diff`` (``[4, N]``, gt ht gp hp): where the run computes each micro-batch's
    gradient by other arithmetic than this one-process backward (DeepSpeed ZeRO-3's
    hooks), the measured ``sum_m |x_m - x'_m|`` of the run's own gradients against
    plain torch's on the same parameters; it enters the bound as a buffer difference
    (every formula below takes ``roundings * u * terms`` as the buffers' difference).
    """
    load(engine, engine.model, state)
    terms = None
    for j, batch in enumerate(batches):
        before = [b.double() for b in _buffers(engine)] if j else None
        engine.backward(batch, last=j == len(batches) - 1)
        after = [b.double() for b in _buffers(engine)]
        delta = torch.stack([a - b for a, b in zip(after, before)] if before else after).abs()
        terms = delta if terms is None else terms + delta
    sums = torch.stack(_buffers(engine)).double()
    if grad_diff is not None:
        terms = terms + grad_diff.double() / (accumulation_roundings(world, micro) * U32)
    seen = {}

    def record(*_) -> None:
        seen["d"] = _direction(engine)

    hook = engine.optimizer.register_step_pre_hook(record)
    try:
        figures = engine.step()
    finally:
        hook.remove()
    cfg = engine.config
    sizes = engine.layout.sizes_t.cpu()
    n = len(batches)
    roundings = accumulation_roundings(world, micro)
    res = engine.last_result
    out = {"figures": figures, "direction": seen.get("d", torch.zeros(sums.shape[1]))}
    if cfg.mode == "ft":
        rows = torch.zeros(sizes.numel(), 4, dtype=torch.float64)
        rows[:, 0] = 1.0 / n
        noise = None
    else:
        rows = _rows(res, cfg, 1.0 / n, engine.exchange.masked)
        noise = None
        rel = buffer_noise(terms, sums, sizes, roundings)
        if cfg.mode == "mdgd":
            noise = coefficient_noise(
                res.stats.cpu(),
                sizes,
                res.k.cpu(),
                res.s_phi.cpu(),
                scale=1.0 / n,
                eps=cfg.eps,
                pieces=pieces,
                buffer_rel=rel,
            )
        u = 2 * stats_roundoff(sizes) + (pieces - 1) * U32 + 2 * rel
        out["mask"] = res.mask.cpu().clone()
        out["cos"] = res.cos.cpu().double()
        # each run's float32 cos is its float64 value rounded once
        out["cos_bound"] = cos_bound(res.stats.cpu(), u, 2 * U32)
    out["dg"] = direction_noise(terms, sums, sizes, rows, roundings, noise)
    out["sizes"] = sizes
    out["group"] = {k: v for k, v in engine.optimizer.param_groups[0].items() if k != "params"}
    out["optimizer"] = type(engine.optimizer).__name__
    params = dict(engine.model.named_parameters())
    out["numels"] = {name: params[name].numel() for name in engine.param_names}
    out.update(capture(engine, engine.model))
    return out


def _rows(res, cfg, scale: float, masked: str) -> torch.Tensor:
    """The ``[S, 4]`` coefficient rows the step applied (float64), from its result."""
    k, s_p = res.k.cpu().double(), res.s_phi.cpu().double()
    one, zero = torch.ones_like(k), torch.zeros_like(k)
    a = one if cfg.align else zero
    if cfg.mode == "mdgd":
        return torch.stack([one, a, k, -k * s_p], 1) * scale
    m = res.mask.cpu().double()
    rows = torch.stack([m, m * a, zero, zero], 1) * scale
    if masked == "keep":  # dropped: untouched, and their parameters get no gradient
        rows[~res.mask.cpu()] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    return rows


def undetermined(after: dict, ref: dict) -> torch.Tensor:
    """Per element: True inside a segment whose MDGD-GM selection differs between the
    run and the reference. Allowed only where the reference's cos is within its bound
    of the selection threshold (either side is right); anywhere else it fails."""
    sizes = ref["sizes"]
    if ref.get("mask") is None or after.get("mask") is None:
        return torch.zeros(int(sizes.sum()), dtype=torch.bool)
    flip = after["mask"] != ref["mask"]
    if flip.any():
        threshold = ref["cos"][ref["mask"]].min()
        near = (ref["cos"] - threshold).abs() <= ref["cos_bound"]
        bad = flip & ~near
        assert not bad.any(), (
            f"MDGD-GM selects segments {torch.nonzero(bad).flatten()[:5].tolist()} differently, "
            f"cos {ref['cos'][bad][:5].tolist()} (threshold {float(threshold)}, bound "
            f"{ref['cos_bound'][bad][:5].tolist()})"
        )
    return torch.repeat_interleave(flip, sizes)


def assert_step_matches(what: str, before: dict, after: dict, ref: dict) -> None:
    """The run's state ``after`` one step from ``before`` equals the reference's step from
    the same state, element by element within the derived bound (tolerances.py)."""
    skip = undetermined(after, ref)
    dg = torch.where(skip, torch.inf, ref["dg"])
    group = ref["group"]
    if ref["optimizer"] == "SGD":
        if group["momentum"] or group["weight_decay"] or group.get("maximize"):
            raise ValueError("the SGD bound models plain SGD (no momentum, no weight decay)")
        step = sgd_step_noise(group["lr"], dg, ref["direction"])
    elif ref["optimizer"] == "AdamW":
        mom = flat_moments(ref, ref["numels"])
        step = adamw_step_noise(
            group, mom["step"].clamp(min=1), mom["exp_avg"], mom["exp_avg_sq"], dg
        )
        untouched = mom["step"] == flat_moments(before, ref["numels"])["step"]
        step = torch.where(untouched & ~skip, 0.0, step)  # no gradient: not stepped at all
        assert_moments(what, after, ref, dg)
    else:
        raise ValueError(f"no bound for optimizer {ref['optimizer']}")
    bound = parameter_bound(ref["params"], step)
    assert_within(after["params"], ref["params"], bound, f"{what}: parameters")


def assert_moments(what: str, after: dict, ref: dict, dg: torch.Tensor) -> None:
    """AdamW's moments after the step: ``|dm| = (1 - b1)|dg|``, ``|dv| = (1 - b2)
    |g^2 - g'^2|``, plus each run's roundings (lerp: 3, mul + addcmul: 3) of the new value."""
    b1, b2 = ref["group"]["betas"]
    got = flat_moments(after, ref["numels"])
    want = flat_moments(ref, ref["numels"])
    assert torch.equal(got["step"], want["step"]), f"{what}: the optimizer's step counts differ"
    g = ref["direction"].abs()
    dm = (1 - b1) * dg
    dv = (1 - b2) * (2 * g + dg) * dg
    bound_m = dm + 6 * U32 * (want["exp_avg"].abs() + dm)
    bound_v = dv + 6 * U32 * (want["exp_avg_sq"] + dv)
    assert_within(got["exp_avg"], want["exp_avg"], bound_m, f"{what}: exp_avg")
    assert_within(got["exp_avg_sq"], want["exp_avg_sq"], bound_v, f"{what}: exp_avg_sq")
