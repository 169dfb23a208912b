"""Timing shared by the benchmarks: device sync, median with the 20th and 80th percentiles,
and the machine a result was measured on (written into every JSON result)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch


class Timing(NamedTuple):
    """Median and 20th/80th percentiles of repeated calls, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so host clocks time the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def p20_p80(xs: list[float]) -> tuple[float, float]:
    """20th and 80th percentiles (both equal to the one sample when there is one)."""
    q = statistics.quantiles(xs, n=5, method="inclusive") if len(xs) > 1 else xs * 4
    return q[0], q[3]


def summarise_ms(times_ms: list[float]) -> Timing:
    return Timing(statistics.median(times_ms), *p20_p80(times_ms))


def time_call(
    fn: Callable[[], object],
    setup: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
) -> Timing:
    """Time ``fn`` ``repeats`` times after ``warmup`` calls; ``setup`` runs untimed before each.

    On CUDA with events around the call; on CPU with ``time.perf_counter``.
    """
    for _ in range(warmup):
        setup()
        fn()
    times = []
    for _ in range(repeats):
        setup()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return summarise_ms(times)


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)


def machine(device: torch.device, started: _dt.datetime | None = None) -> dict:
    """What a result was measured on: device, CPU, threads, versions, commit and UTC time."""
    info = {
        "device": str(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "commit": _git_commit(),
        "time": (started or utc_now()).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git_commit() -> str:
    """The checkout's commit, or "unknown" (an installed wheel has none)."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"
