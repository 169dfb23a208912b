"""Launch the 2 ranks of a gloo group as plain processes (no torchrun), bounded by a timeout.

launch_ranks([script, *args], timeout=120, what="my scenario")
launch("steps", out_dir)  # a scenario of dist_worker.py (its SCENARIOS)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

WORLD = 2
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(argv: list[str], timeout: float, what: str) -> None:
    """Run ``python *argv`` as the 2 ranks of a gloo group; fail (never hang) when one
    fails or overruns."""
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            LOCAL_WORLD_SIZE=str(WORLD),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} of {what} failed:\n{log[-4000:]}"


def launch(scenario: str, out, timeout: float = 120.0) -> None:
    """Run the 2 ranks of ``dist_worker.py``'s ``scenario``."""
    argv = [os.path.join(HERE, "dist_worker.py"), scenario, str(out)]
    launch_ranks(argv, timeout, repr(scenario))
