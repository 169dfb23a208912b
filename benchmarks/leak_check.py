"""Leak check: RSS over many steps of the tiny LLaVA, in every mode.

    python benchmarks/leak_check.py                      # 500 steps of mdgd, gm, ft
    python benchmarks/leak_check.py --steps 100 --modes mdgd

Each mode runs in a fresh subprocess (AdamW, dropout on, a new random batch every
step, ``nonfinite="skip"``, one thread). The resident set size (``VmRSS``) is
sampled every 10 steps; after ``--warmup`` steps (allocator pools, optimizer state
and autograd caches settle) it must not grow by more than ``--bound-mb`` MB up to
the last step, and its least-squares slope over the same window is reported in
KB/step (a leak of one float32 copy of the trainable gradients per step, 22,720
elements or ~89 KB, would show as ~89 KB/step and ~35 MB over the window). Prints
one JSON line per mode and exits non-zero when a mode breaks the bound. Not part of
the test suite: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def run_mode(mode: str, steps: int) -> list[tuple[int, float]]:
    import torch

    from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns
    from mdgd.testing import perturbed_copy, random_batch, tiny_llava

    torch.set_num_threads(1)
    ref = tiny_llava(seed=0, attention_dropout=0.1)
    theta = perturbed_copy(ref, seed=1)
    theta.train()
    cfg = MDGDConfig(
        mode=mode, alpha=0.5, nonfinite="skip", trainable=llava_trainable_patterns(ref.config, 2)
    )
    engine = MDGDEngine(theta, ref, None, cfg)
    engine.optimizer = torch.optim.AdamW(
        [p for p in theta.parameters() if p.requires_grad], lr=1e-3
    )
    samples = []
    for step in range(steps):
        engine.step(random_batch(theta.config, seed=step))
        if (step + 1) % 10 == 0:
            samples.append((step + 1, rss_mb()))
    return samples


def summarise(mode: str, samples, warmup: int, bound_mb: float) -> dict:
    window = [(s, r) for s, r in samples if s >= warmup]
    xs, ys = [s for s, _ in window], [r for _, r in window]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    growth = ys[-1] - ys[0]
    return {
        "mode": mode,
        "steps": samples[-1][0],
        "rss_at_warmup_mb": round(ys[0], 1),
        "rss_last_mb": round(ys[-1], 1),
        "rss_max_mb": round(max(ys), 1),
        "growth_mb": round(growth, 2),
        "slope_kb_per_step": round(slope * 1024, 2),
        "bound_mb": bound_mb,
        "ok": growth <= bound_mb,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--bound-mb", type=float, default=8.0)
    ap.add_argument("--modes", nargs="+", default=["mdgd", "gm", "ft"])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_mode(args.child, args.steps)))
        return
    failed = False
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(args.steps)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        samples = json.loads(out.stdout.strip().splitlines()[-1])
        row = summarise(mode, samples, args.warmup, args.bound_mb)
        failed |= not row["ok"]
        print(json.dumps(row), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
