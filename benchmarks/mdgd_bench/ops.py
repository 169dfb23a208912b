"""Op benchmark: the fused MDGD ops against the pure-torch ways of writing them.

Run it as ``mdgd bench`` or ``python benchmarks/bench_ops.py``. One run measures,
on the same machine and in the same process:

* the machine's copy bandwidth (``dst.copy_(src)`` on a buffer far larger than
  the last-level cache): the practical ceiling for a memory-bound op;
* pass 1 (``segment_gram``), pass 2 (the in-place combine) and the whole
  ``mdgd_direction_`` of the fused backend (auto: C++ on CPU, Triton on CUDA,
  plus ``cuda`` when built);
* the composed-torch backend (``backend="torch"``);
* the per-tensor reference a user writes by hand (a Python loop of ``torch.dot``
  and ``add_`` in float32, :func:`mdgd_kernels.reference.per_tensor_direction_`);
* ``torch.compile`` of that per-tensor function (one dynamic-shape graph, called
  per tensor).

Workloads: ``llava-layer``, the gradient of one LLaVA-1.5-7B decoder layer
(q, k, v, o 4096x4096; gate, up 11008x4096; down 4096x11008; two 4096 norms:
202M elements per buffer), and ``small``, 2,000 small tensors (64 to 8,192
elements). GB/s is counted at the traffic budget of docs/math.md §9: pass 1 reads the four
buffers (4eN bytes for e-byte elements), pass 2 reads four and writes one (5eN),
so the whole op is 9eN (18N for bf16), whatever the implementation really moves.

Caveats: caches are not flushed between repeats on CPU (the layer workload is
1.6 GB, far beyond any cache; the small one fits in L3 on big hosts). On CUDA the
small workload rotates through several buffer sets so that their total exceeds
L2. ``g_theta`` is restored from a pristine copy before each timed call (outside
the timed region), because the op overwrites it. Times are medians with the
20th and 80th percentiles.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

import mdgd_kernels as mk
from mdgd_bench import results
from mdgd_bench.timing import machine, time_call, utc_now
from mdgd_kernels.backends import kernels
from mdgd_kernels.reference import per_tensor_direction_

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def llava_layer_sizes(hidden: int = 4096, inter: int = 11008) -> list[int]:
    return [hidden * hidden] * 4 + [inter * hidden] * 3 + [hidden] * 2


def small_sizes(count: int = 2000, lo: int = 64, hi: int = 8192, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (count,), generator=gen).tolist()


WORKLOADS = {
    "llava-layer": lambda quick: llava_layer_sizes(512, 1376) if quick else llava_layer_sizes(),
    "small": lambda quick: small_sizes(200 if quick else 2000),
}


@dataclass
class Row:
    workload: str
    method: str
    numel: int
    segments: int
    median_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float
    frac_copy_bw: float
    speedup_vs_per_tensor: float | None = None
    peak_mem_mb: float | None = None


@dataclass
class Report:
    machine: dict
    copy_bw_gbps: float
    dtype: str
    rows: list[Row] = field(default_factory=list)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """GB/s of ``dst.copy_(src)``, counting the bytes read plus the bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    med = time_call(lambda: dst.copy_(src), lambda: None, device, repeats).median_ms
    return 2 * nbytes / (med * 1e-3) / 1e9


# --------------------------------------------------------------------------- methods


def _per_tensor_compiled():
    def one(gt, ht, gp, hp, eps: float = 1e-6):
        a, b, c, d = gt.float(), ht.float(), gp.float(), hp.float()
        hh, pp = torch.dot(b, b), torch.dot(d, d)
        s_t = torch.where(hh != 0, torch.dot(a, b) / hh, 0.0)
        s_p = torch.where(pp != 0, torch.dot(c, d) / pp, 0.0)
        gbar_t, gbar_p = a - s_t * b, c - s_p * d
        nbp = torch.dot(gbar_p, gbar_p)
        k = torch.where(nbp > eps * torch.dot(c, c), torch.dot(gbar_t, gbar_p) / nbp, 0.0)
        return (a + b + k * gbar_p).to(gt.dtype)

    compiled = torch.compile(one, dynamic=True)

    def run(gts, hts, gps, hps):
        for gt, ht, gp, hp in zip(gts, hts, gps, hps):
            gt.copy_(compiled(gt, ht, gp, hp))

    return run


def _buffers(sizes, dtype, device, sets: int):
    n = sum(sizes)
    # drawn where the buffers live: 800M normal draws take seconds on a CPU
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    for _ in range(sets):
        bufs = []
        for _ in range(4):
            b = torch.empty(n, dtype=dtype, device=device)
            # fill in slices: randn of 200M float32 at once would need 800 MB extra
            for lo in range(0, n, 1 << 24):
                hi = min(n, lo + (1 << 24))
                b[lo:hi] = torch.randn(hi - lo, generator=gen, device=device).to(dtype)
            bufs.append(b)
        out.append(bufs)
    return out


def bench_workload(
    name: str, sizes: list[int], dtype: torch.dtype, device: torch.device, args, copy_bw: float
) -> list[Row]:
    elem = torch.tensor([], dtype=dtype).element_size()
    n, segs = sum(sizes), len(sizes)
    set_bytes = 4 * n * elem
    sets = 1
    if device.type == "cuda":  # rotate buffer sets so that they do not sit in L2
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        sets = max(1, min(8, -(-2 * l2 // set_bytes)))
    all_bufs = _buffers(sizes, dtype, device, sets)
    pristine = [b[0].clone() for b in all_bufs]
    layout = mk.get_layout(sizes, device)
    state = {"i": 0}

    def cur():
        return all_bufs[state["i"]]

    def restore():
        state["i"] = (state["i"] + 1) % sets
        cur()[0].copy_(pristine[state["i"]])

    rows: list[Row] = []

    def add(method, fn, traffic, setup=restore, repeats=args.repeats, peak=None):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        med, p20, p80 = time_call(fn, setup, device, repeats)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        gbps = traffic * elem * n / (med * 1e-3) / 1e9
        rows.append(Row(name, method, n, segs, med, p20, p80, gbps, gbps / copy_bw, None, peak))
        print(f"  {name:12s} {method:28s} {med:10.2f} ms  {gbps:8.1f} GB/s", flush=True)

    fused = mk.resolve_backend(None, device)
    fused_backends = [fused] + (
        ["cuda"]
        if device.type == "cuda" and "cuda" in mk.available_backends(device) and fused != "cuda"
        else []
    )

    def fused(backend: str) -> None:
        gram, combine = kernels(backend)
        add(f"fused[{backend}] pass1", lambda: gram(*cur(), layout.chunks, layout.chunk_ptr), 4)
        stats = gram(*cur(), layout.chunks, layout.chunk_ptr)
        coef = mk.coefficients(stats, layout.sizes_t, mode="mdgd").coeffs
        add(f"fused[{backend}] pass2", lambda: combine(*cur(), layout.chunks, coef), 5)
        add(
            f"fused[{backend}] mdgd_direction_",
            lambda: mk.mdgd_direction_(*cur(), layout, backend=backend, nonfinite="skip"),
            9,
        )

    for backend in fused_backends:
        fused(backend)
    if not args.skip_torch_backend:
        add(
            "torch backend",
            lambda: mk.mdgd_direction_(*cur(), layout, backend="torch", nonfinite="skip"),
            9,
            repeats=max(1, args.repeats // 4),
        )

    def split(bufs):
        return [list(torch.split(b, sizes)) for b in bufs]

    views = [split(b) for b in all_bufs]
    add(
        "per-tensor reference",
        lambda: per_tensor_direction_(*views[state["i"]]),
        9,
        repeats=max(1, args.repeats // 4),
    )
    if not args.no_compile:
        run = _per_tensor_compiled()
        t0 = time.perf_counter()
        run(*views[state["i"]])  # compile outside the timing
        print(f"  (torch.compile warm-up took {time.perf_counter() - t0:.1f} s)", flush=True)
        add(
            "torch.compile(per-tensor)",
            lambda: run(*views[state["i"]]),
            9,
            repeats=max(1, args.repeats // 4),
        )

    base = next(r.median_ms for r in rows if r.method == "per-tensor reference")
    for r in rows:
        r.speedup_vs_per_tensor = base / r.median_ms
    return rows


def _print_table(report: Report) -> None:
    print()
    print(
        f"machine: {report.machine['cpu']}  ({report.machine['device']}, "
        f"{report.machine['threads']} threads, torch {report.machine['torch']})"
    )
    print(f"measured copy bandwidth: {report.copy_bw_gbps:.1f} GB/s; dtype {report.dtype}")
    head = (
        f"{'workload':12s} {'method':30s} {'elements':>12s} {'median ms':>10s} "
        f"{'p20-p80 ms':>17s} {'GB/s':>8s} {'of copy':>8s} {'speedup':>8s}"
    )
    print(head)
    print("-" * len(head))
    for r in report.rows:
        print(
            f"{r.workload:12s} {r.method:30s} {r.numel:12,d} {r.median_ms:10.2f} "
            f"{r.p20_ms:8.2f}-{r.p80_ms:<8.2f} {r.gbps:8.1f} {r.frac_copy_bw:8.0%} "
            f"{r.speedup_vs_per_tensor:7.1f}x"
        )
    print(
        "GB/s counted at the budget of docs/math.md §9 (pass 1: 4 reads, "
        "pass 2: 4 reads + 1 write, whole op: 9 element-passes); "
        "speedup vs the per-tensor float32 loop."
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark the fused MDGD ops against pure-torch references "
        "(per-tensor loop, torch backend, torch.compile) and the machine's copy bandwidth.",
        epilog="The training-step benchmark is 'mdgd bench step' (benchmarks/bench_step.py).",
    )
    p.add_argument(
        "--workload",
        choices=[*WORKLOADS, "all"],
        default="all",
        help="which gradient layout to time (default: all)",
    )
    p.add_argument(
        "--dtype", choices=list(DTYPES), default="bf16", help="gradient dtype (default: bf16)"
    )
    p.add_argument(
        "--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed repeats per fused method; the slow references use a quarter",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (a 1/8-width LLaVA layer, 200 small tensors) for smoke tests",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="skip torch.compile of the reference (its compile takes a while)",
    )
    p.add_argument(
        "--skip-torch-backend", action="store_true", help="skip the composed-torch backend"
    )
    results.add_arguments(p)
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> Report:
    """Run the op benchmark (``argv`` as on the command line), print the table, save the JSON."""
    args = build_parser(prog).parse_args(argv)
    started = utc_now()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    repeats = max(3, args.repeats)
    args.repeats = repeats
    copy_bytes = (64 << 20) if args.quick else (1 << 30)
    copy_bw = copy_bandwidth(device, copy_bytes, repeats)
    report = Report(machine=machine(device, started), copy_bw_gbps=copy_bw, dtype=args.dtype)
    print(f"copy bandwidth on {device}: {copy_bw:.1f} GB/s", flush=True)
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    for name in names:
        sizes = WORKLOADS[name](args.quick)
        print(f"workload {name}: {len(sizes):,} tensors, {sum(sizes):,} elements", flush=True)
        report.rows += bench_workload(name, sizes, dtype, device, args, copy_bw)
    _print_table(report)
    record = {"benchmark": "ops", **asdict(report)}
    results.save(
        record, args, benchmark="ops", device=device.type, dtype=args.dtype, started=started
    )
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
