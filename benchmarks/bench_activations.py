"""Activation memory of the reference model (phi), with and without recomputation.

    python benchmarks/bench_activations.py                    # default small LLaVA, CPU
    python benchmarks/bench_activations.py --text-layers 8 --batch-size 16

MDGD backpropagates through phi (``g_phi``, ``h_phi``), so phi's forward keeps
a graph. The engine keeps phi in ``eval()``, where transformers' activation
checkpointing does not recompute; ``mdgd.recompute_layers`` (applied by the
engine when theta checkpoints) makes phi's layers recompute.

Each variant runs in a fresh process: build the model, then phi's forward with
hidden states (as the engine runs it; the trainable parameters of the last
``--trainable-layers`` decoder layers and the projector require grad), keeping
the output and its graph alive. Two measurements of what that graph holds:

* ``saved MB``: bytes of the distinct storages autograd saves for backward,
  counted with ``torch.autograd.graph.saved_tensors_hooks`` (exact; under
  non-reentrant checkpointing it counts what is saved outside the recomputed
  layers, and the checkpoint keeps each layer's inputs besides);
* ``RSS MB``: growth of the process's resident memory across the forward, with
  large allocations served by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``) so that
  freed memory leaves the process (on CUDA: ``memory_allocated`` growth).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from mdgd_bench.model import add_size_arguments, size_kwargs


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args: argparse.Namespace) -> dict:
    from mdgd import ImageTokenHidden, llava_trainable_patterns, mark_trainable, recompute_layers
    from mdgd.testing import random_batch, tiny_llava

    torch.set_num_threads(1)
    device = torch.device(args.device)
    phi = tiny_llava(seed=0, **size_kwargs(args)).to(device).eval()
    mark_trainable(phi, llava_trainable_patterns(phi, args.trainable_layers))
    if args.variant == "recompute":
        recompute_layers(phi)
    batch = random_batch(phi.config, args.batch_size, args.text_len, seed=0, device=device)
    kw = {**ImageTokenHidden().forward_kwargs, **batch}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else _resident_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = phi(**kw)
    after = torch.cuda.memory_allocated(device) if cuda else _resident_bytes()
    assert out.loss.requires_grad
    return {
        "variant": args.variant,
        "saved_mb": sum(seen.values()) / 2**20,
        "growth_mb": (after - before) / 2**20,
        "growth_kind": "cuda memory_allocated" if cuda else "process RSS",
        "params": sum(p.numel() for p in phi.parameters()),
        "tokens": batch["input_ids"].numel(),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--text-len", type=int, default=64)
    add_size_arguments(p, skip=("vision_layers",))  # tiny_llava's one vision layer
    p.add_argument("--trainable-layers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # worker
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.variant:
        print(json.dumps(worker(args)))
        return []
    base = list(argv if argv is not None else sys.argv[1:])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    rows = []
    for variant in ("keep", "recompute"):
        cmd = [sys.executable, __file__, *base, "--variant", variant]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            raise SystemExit(f"variant {variant} failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r0 = rows[0]
    print(
        f"phi: {r0['params'] / 1e6:.2f}M parameters, {r0['tokens']} tokens "
        f"(batch {args.batch_size}), {args.device}"
    )
    print("phi's layers     saved MB   growth MB")
    for r in rows:
        print(f"{r['variant']:<15} {r['saved_mb']:9.1f}  {r['growth_mb']:10.1f}")
    return rows


if __name__ == "__main__":
    main()
