"""Launch the 2 ranks of a gloo group as plain processes (no torchrun), bounded by a timeout.

launch_ranks([script, *args], timeout=120, what="my scenario")
launch("steps", out_dir)  # a scenario of dist_worker.py (its SCENARIOS)
run_rank(body)            # in a rank's script: run it, exit 0, or 1 with the traceback
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import NoReturn

WORLD = 2
HERE = os.path.dirname(os.path.abspath(__file__))


def run_rank(body: Callable[[], object]) -> NoReturn:
    """A rank's whole run: ``body()``, then exit 0, or 1 with the traceback printed. It
    exits with ``os._exit``, skipping ``destroy_process_group``: a peer may already be
    gone, and the group's teardown would wait for it."""
    try:
        body()
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(argv: list[str], timeout: float, what: str) -> None:
    """Run ``python *argv`` as the 2 ranks of a gloo group; fail (never hang) when one
    fails or overruns.

    Each rank writes to a file of its own, not to a pipe: a rank that wrote more than a
    pipe's buffer (64 KiB: DeepSpeed and the Trainer log a lot) while this process waited
    on the other rank would block in ``write`` with the other rank waiting for it in a
    collective, a deadlock that only the timeout ends."""
    port = free_port()
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory() as logs_dir:
        procs, files = [], []
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
            files.append(open(os.path.join(logs_dir, f"rank{rank}.log"), "w+"))  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, *argv], env=env, stdout=files[-1], stderr=subprocess.STDOUT
                )
            )
        try:
            for p in procs:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            logs = []
            for f in files:
                f.seek(0)
                logs.append(f.read())
                f.close()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} of {what} failed:\n{log[-4000:]}"


def launch(scenario: str, out, timeout: float = 120.0) -> None:
    """Run the 2 ranks of ``dist_worker.py``'s ``scenario``."""
    argv = [os.path.join(HERE, "dist_worker.py"), scenario, str(out)]
    launch_ranks(argv, timeout, repr(scenario))
