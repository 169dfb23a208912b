"""A tiny MDGD training run that resumes from its checkpoint and can SIGKILL itself.

    python tests/helpers/kill_resume_worker.py OUT_DIR

trains the tiny LLaVA of ``llava_tiny`` (``mode="mdgd"``, AdamW, dropout on) for
``STEPS`` steps, saving a checkpoint into ``OUT_DIR/ckpt`` every ``EVERY`` steps and
resuming from it if it is there; at the end it writes theta's trainable parameters
and the optimizer's tensors to ``OUT_DIR/final.safetensors``. With
``MDGD_KILL_AT=<point>:<n>`` it kills itself (SIGKILL: no cleanup runs) at the
``n``-th (1-based, counted in this process) occurrence of ``point``:

- ``backward``: inside autograd, in the projector's backward hook;
- ``op``: right after ``mdgd_direction_`` wrote the direction, before the step uses it;
- ``optimizer``: after the optimizer moved the parameters, inside ``engine.step``;
- ``save``: at a file operation of a checkpoint save (``os.replace`` / ``os.fsync``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors.torch import save_file  # noqa: E402
from tiny_engines import make_engine, run_steps  # noqa: E402

import mdgd_kernels  # noqa: E402

STEPS, EVERY = 7, 3


def install_kill(engine, spec: str) -> None:
    point, n = spec.split(":")
    count = [0]

    def maybe_die(*_args, **_kwargs) -> None:
        count[0] += 1
        if count[0] == int(n):
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "backward":
        projector = next(m for n, m in engine.model.named_modules() if n.endswith("projector"))
        projector.register_full_backward_hook(maybe_die)
    elif point == "optimizer":
        engine.optimizer.register_step_post_hook(maybe_die)
    elif point == "op":
        op = mdgd_kernels.mdgd_direction_

        def op_then_die(*args, **kwargs):
            res = op(*args, **kwargs)
            maybe_die()
            return res

        mdgd_kernels.mdgd_direction_ = op_then_die
    elif point == "save":
        for name in ("replace", "fsync"):
            fn = getattr(os, name)
            setattr(os, name, lambda *a, _fn=fn, **k: (maybe_die(), _fn(*a, **k))[1])
    else:
        raise ValueError(f"unknown kill point {point!r}")


def main(out: Path) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    engine = make_engine("mdgd")
    ckpt = out / "ckpt"
    if (ckpt / "state.pt").exists():
        engine.load_checkpoint(ckpt)
    if os.environ.get("MDGD_KILL_AT"):
        install_kill(engine, os.environ["MDGD_KILL_AT"])
    for s in range(engine.step_count, STEPS):
        run_steps(engine, [s])
        if (s + 1) % EVERY == 0:
            engine.save_checkpoint(ckpt)
    tensors = {f"p/{n}": p.detach() for n, p in zip(engine.param_names, engine.theta.params)}
    for i, st in enumerate(engine.optimizer.state.values()):
        tensors |= {f"o/{i}/{k}": v for k, v in st.items() if torch.is_tensor(v)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "final.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
