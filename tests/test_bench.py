"""The op benchmark runs, measures and saves machine-readable rows (no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mdgd.bench import llava_layer_sizes, main


def test_llava_layer_workload_is_202m_elements():
    assert sum(llava_layer_sizes()) == 202_383_360
    assert len(llava_layer_sizes()) == 9


def test_bench_quick_writes_json(tmp_path, capsys):
    report = main(
        [
            "--quick",
            "--workload",
            "small",
            "--repeats",
            "3",
            "--no-compile",
            "--skip-torch-backend",
            "--out",
            str(tmp_path),
        ]
    )
    files = list(tmp_path.glob("ops-quick-cpu-bf16-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["copy_bw_gbps"] > 0 and data["copy_bw_gbps"] == report.copy_bw_gbps
    methods = {r["method"] for r in data["rows"]}
    assert "per-tensor reference" in methods
    assert any(m.endswith("mdgd_direction_") for m in methods)
    for row in data["rows"]:
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["numel"] == sum(r["numel"] for r in data["rows"][:1])
    out = capsys.readouterr().out
    assert "measured copy bandwidth" in out and "speedup" in out


def test_step_bench_runs_every_row_on_a_tiny_llava(tmp_path):
    """Every row of benchmarks/bench_step.py runs against the current engine."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"
    out = tmp_path / "step.json"
    tiny = "--steps 1 --rounds 1 --warmup 1 --batch-size 2 --text-len 8 --image-size 16"
    tiny += " --vision-hidden 32 --text-hidden 32 --text-layers 2 --trainable-layers 1"
    tiny += " --vocab-size 64 --heads 2 --threads 1"
    tiny += " --modes ft,mdgd,mdgd-per-tensor,mdgd-recompute,mdgd-dp,mdgd-fsdp"
    run = subprocess.run(
        [sys.executable, str(script), *tiny.split(), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["mode"] for r in rows] == [
        "ft",
        "mdgd",
        "mdgd-per-tensor",
        "mdgd-recompute",
        "mdgd-dp",
        "mdgd-fsdp",
    ]
    assert all(r["samples_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    dp, fsdp = rows[-2:]
    # 2 ranks: FSDP2 holds about half of dp's gradient and optimizer bytes per rank
    for key in ("grads_mb", "optim_mb"):
        assert 0.4 < fsdp[key] / dp[key] < 0.6, (key, fsdp[key], dp[key])
