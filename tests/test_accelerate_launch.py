"""``accelerate launch`` runs ``mdgd train`` on 2 CPU ranks (gloo) as ``torchrun`` does.

accelerate 1.16 starts several local processes (through torchrun) only with
``--multi_gpu``, which on a machine without GPUs starts CPU processes all the same;
``--cpu`` takes its simple launcher, which starts one process whatever
``--num_processes`` says. ``mdgd train``'s ``--use_cpu true --ddp_backend gloo`` then
make the ranks a gloo group. Without ``--config_file`` accelerate reads
``$HF_HOME/accelerate/default_config.yaml``: ``HF_HOME`` is an empty folder here,
and no ``ACCELERATE_*`` variable of the caller's passes, so a user's setup is not read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from launch import free_port
from llava_tiny import one_thread  # noqa: F401  (fixture)
from tiny_checkpoints import flags, save_tiny_model, write_dataset

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from mdgd.monitor import HISTORY_NAME  # noqa: E402
from mdgd.train import SUMMARY_NAME  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = os.path.join(ROOT, "tests", "helpers")
TIMEOUT_S = 300


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{what}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_accelerate_launch_trains_as_torchrun_and_measures_once(tmp_path):
    """The same flags under ``accelerate launch --multi_gpu --num_processes 2`` and under
    ``torchrun --nproc-per-node 2``: the same trained model, bit for bit, and the same
    figures; the forgetting monitor measured on rank 0 only (``mdgd_counted`` is
    ``python -m mdgd`` with the monitor's measurement calls counted per rank)."""
    d = tmp_path / "llava"
    write_dataset(d)
    save_tiny_model("llava", d / "model")
    eval_file = d / "eval.json"
    eval_file.write_text(json.dumps(json.loads((d / "data.json").read_text())[:6]))
    common = {
        "max_steps": 4,
        "ddp_backend": "gloo",
        "ddp_timeout": 120,
        "monitor-steps": 2,
        "eval-data": eval_file,
        "eval-max-new-tokens": 2,
    }
    (tmp_path / "hf_home").mkdir()
    counts = tmp_path / "counts"
    counts.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(
        HF_HOME=str(tmp_path / "hf_home"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([ROOT, HELPERS]),
        MDGD_COUNTS=str(counts),
    )
    env.pop("LOCAL_RANK", None)
    accelerate = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
    accelerate += ["--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    accelerate += ["--main_process_port", str(free_port())]
    accelerate += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    _run(
        [*accelerate, "-m", "mdgd_counted", "train", *flags(d, tmp_path / "acc", **common)],
        env,
        "accelerate launch",
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc-per-node", "2", "-m", "mdgd", "train"]
    _run([*torchrun, *flags(d, tmp_path / "torchrun", **common)], env, "torchrun")

    acc, ref = (
        load_file(tmp_path / "acc" / "model.safetensors"),
        load_file(tmp_path / "torchrun" / "model.safetensors"),
    )
    start = load_file(d / "model" / "model.safetensors")
    assert acc.keys() == ref.keys() and any(not torch.equal(acc[k], start[k]) for k in acc)
    assert all(torch.equal(acc[k], ref[k]) for k in acc)
    s_acc, s_ref = (
        json.loads((tmp_path / r / SUMMARY_NAME).read_text()) for r in ("acc", "torchrun")
    )
    for key in ("steps", "first_loss", "final_loss", "figures"):
        assert s_acc[key] == s_ref[key], key
    assert {"mdgd/erank", "mdgd/erank_ref", "eval/accuracy"} <= s_acc["figures"].keys()
    calls = [json.loads((counts / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    # rank 0: phi's erank, then theta's and the accuracy at steps 1, 2 and 4
    assert calls == [{"visual_erank": 4, "exact_match": 3}, {"visual_erank": 0, "exact_match": 0}]
    history = json.loads((tmp_path / "acc" / HISTORY_NAME).read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 4]
