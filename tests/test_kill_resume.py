"""Kill-and-resume: a training process SIGKILLed during backward, the op, the optimizer
step or a checkpoint save, resumed from what is on disk, ends bit-identical to a run
that was never interrupted (tests/kill_resume_worker.py is the training process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
WORKER = os.path.join(HELPERS, "kill_resume_worker.py")

# name: (MDGD_KILL_AT, the step of the checkpoint on disk after the kill). Seven steps,
# saves after steps 3 and 6; a save's file operations are fsync(tensors tmp), rename,
# fsync(dir), fsync(state tmp), rename (the commit), fsync(dir)
KILL_POINTS = {
    "backward-step2": ("backward:3", None),  # two backward calls per step (g, then h)
    "op-step3": ("op:3", None),  # before the first checkpoint: resumes from scratch
    "optimizer-step5": ("optimizer:5", 3),
    "save-tensors-rename": ("save:8", 3),  # second save, before its tensors are in place
    "save-state-commit": ("save:11", 3),  # second save, before state.pt is renamed
    "save-after-commit": ("save:12", 6),  # second save committed, directory not synced
}


def train(out, kill: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MDGD_KILL_AT", None)
    if kill:
        env["MDGD_KILL_AT"] = kill
    return subprocess.run(
        [sys.executable, WORKER, str(out)], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = train(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "final.safetensors"))


@pytest.mark.parametrize("kill, on_disk", KILL_POINTS.values(), ids=KILL_POINTS.keys())
def test_killed_run_resumes_bit_identical(tmp_path, uninterrupted, kill, on_disk):
    killed = train(tmp_path, kill)
    assert killed.returncode == -signal.SIGKILL, f"not killed at {kill}: {killed.stderr[-2000:]}"
    assert not (tmp_path / "final.safetensors").exists()
    state = tmp_path / "ckpt" / "state.pt"
    step = torch.load(state, weights_only=True)["step"] if state.exists() else None
    assert step == on_disk, f"killed at {kill}: the checkpoint on disk is of step {step}"
    resumed = train(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = load_file(str(tmp_path / "final.safetensors"))
    assert got.keys() == uninterrupted.keys()
    differ = [k for k in got if not torch.equal(got[k], uninterrupted[k])]
    assert not differ, f"killed at {kill}, resumed: {len(differ)} tensors differ, e.g. {differ[:3]}"
