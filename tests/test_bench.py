"""The benchmarks run, measure and save machine-readable rows (no timing asserts).

Their code is ``benchmarks/mdgd_bench/``; ``mdgd bench`` and the scripts in ``benchmarks/``
must both reach it, and its results must land where the working directory does not decide.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdgd.cli import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
ops = benchmark_module("ops")  # the same import as `mdgd bench`
results = benchmark_module("results")
step = benchmark_module("step")


def _env() -> dict[str, str]:
    """This checkout's mdgd first, for subprocesses started outside it."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def test_llava_layer_workload_is_202m_elements():
    assert sum(ops.llava_layer_sizes()) == 202_383_360
    assert len(ops.llava_layer_sizes()) == 9


def test_mdgd_bench_quick_runs_the_benchmarks_code_and_writes_json(tmp_path):
    """`mdgd bench --quick`, started outside the checkout, runs benchmarks/mdgd_bench/ops.py."""
    code = (
        "import sys\nfrom mdgd.cli import main\nmain(sys.argv[1:])\n"
        "print('BENCH_FROM', sys.modules['mdgd_bench.ops'].__file__)"
    )
    quick = "--quick --workload small --repeats 3 --no-compile --skip-torch-backend --tag t1"
    cmd = [sys.executable, "-c", code, "bench", *quick.split(), "--out", str(tmp_path / "r")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("BENCH_FROM")]
    assert Path(line.split(maxsplit=1)[1]) == BENCHMARKS / "mdgd_bench" / "ops.py"
    assert "measured copy bandwidth" in run.stdout and "speedup" in run.stdout
    (path,) = (tmp_path / "r").iterdir()
    assert path.name.startswith("ops-cpu-bf16-quick-t1-") and path.name.endswith("Z.json")
    data = json.loads(path.read_text())
    assert data["benchmark"] == "ops" and data["copy_bw_gbps"] > 0
    methods = {r["method"] for r in data["rows"]}
    assert "per-tensor reference" in methods
    assert any(m.endswith("mdgd_direction_") for m in methods)
    for row in data["rows"]:
        assert row["median_ms"] > 0 and row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["numel"] == data["rows"][0]["numel"]


def test_step_bench_runs_every_row_on_a_tiny_llava(tmp_path):
    """Every row of benchmarks/bench_step.py runs against the current engine, from any cwd."""
    tiny = "--steps 1 --rounds 1 --warmup 1 --batch-size 2 --text-len 8 --image-size 16"
    tiny += " --vision-hidden 32 --text-hidden 32 --text-layers 2 --trainable-layers 1"
    tiny += " --vocab-size 64 --heads 2 --threads 1"
    tiny += " --modes ft,mdgd,mdgd-per-tensor,mdgd-recompute,mdgd-dp,mdgd-fsdp"
    run = subprocess.run(
        [sys.executable, BENCHMARKS / "bench_step.py", *tiny.split(), "--out", tmp_path / "r"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=400,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    (path,) = (tmp_path / "r").glob("step-cpu-fp32-*Z.json")
    rows = json.loads(path.read_text())["rows"]
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


def test_step_quick_picks_the_small_configuration_and_explicit_options_win():
    quick = step.parse(["--quick", "--steps", "5"])
    assert quick.steps == 5 and quick.quick
    assert {k: getattr(quick, k) for k in step.QUICK if k != "steps"} == {
        k: v for k, v in step.QUICK.items() if k != "steps"
    }
    full = step.parse([])
    assert all(getattr(full, k) != v for k, v in step.QUICK.items()), "--quick changes nothing"


def test_step_llava_7b_has_the_real_widths_and_explicit_options_win():
    args = step.parse(["--llava-7b", "--text-layers", "3"])
    assert args.text_layers == 3 and args.dtype == "bf16"
    assert (args.text_hidden, args.text_intermediate, args.heads) == (4096, 11008, 32)
    assert (args.vision_hidden, args.vision_intermediate, args.vision_heads) == (1024, 4096, 16)
    assert (args.image_size // args.patch_size) ** 2 == 576  # LLaVA-1.5's image tokens
    with pytest.raises(SystemExit):
        step.parse(["--llava-7b", "--quick"])


def test_step_memory_formula():
    """docs/distributed.md's formula at W = 1: b(M P + K T) + 2b T, in MiB."""
    row = {"total_params": 3 * 2**20, "trainable_params": 2**20, "peak_mem_mb": 100.0}
    row.update(grads_mb=8.0, optim_mb=4.0, params_mb=12.0)
    mdgd = step.formula_bytes(row, "mdgd", torch.bfloat16)
    assert mdgd == {"formula_mb": 2 * (2 * 3 + 4) + 4, "held_mb": 24.0, "activations_mb": 76.0}
    assert step.formula_bytes(row, "ft", torch.float32)["formula_mb"] == 4 * (3 + 1) + 8


def test_default_results_dir_does_not_depend_on_the_working_directory(tmp_path):
    code = "from mdgd.cli import benchmark_module; print(benchmark_module('results').default_dir())"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=_env()
        ).stdout.strip()
        for cwd in (ROOT, tmp_path, BENCHMARKS)
    }
    assert seen == {str(BENCHMARKS / "results")}


def test_results_outside_a_checkout_go_to_the_user_data_dir(monkeypatch, tmp_path):
    monkeypatch.setattr(results, "CHECKOUT_RESULTS", None)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert results.default_dir() == tmp_path / "data" / "mdgd" / "bench-results"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert results.default_dir() == tmp_path / ".local" / "share" / "mdgd" / "bench-results"


def test_result_files_follow_one_naming_scheme(monkeypatch, tmp_path):
    monkeypatch.setattr(results, "CHECKOUT_RESULTS", tmp_path / "results")
    monkeypatch.chdir(tmp_path / "..")
    started = dt.datetime(2026, 11, 25, 12, 41, 58, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    args = argparse.Namespace(out=None, quick=True, tag="dist-22M")
    kw = dict(benchmark="step", device="cuda:1", dtype="bf16", started=started)
    path = results.save({"rows": []}, args, **kw)
    assert path == tmp_path / "results" / "step-cuda-bf16-quick-dist-22M-20261125T114158Z.json"
    with pytest.raises(FileExistsError):  # an earlier result is never overwritten
        results.save({"rows": []}, args, **kw)
    with pytest.raises(ValueError, match="file name"):
        results.result_name("ops", "cpu", "bf16", started, ["a/b"])
    for committed in (BENCHMARKS / "results").glob("*.json"):
        name = committed.name.split("-")
        assert name[0] in ("ops", "step", "startup"), committed.name
        assert name[-1].endswith("Z.json"), committed.name
        data = json.loads(committed.read_text())
        assert (name[1], name[2]) == (data["machine"]["device"], _dtype(data)), committed.name


def _dtype(record: dict) -> str:
    return record.get("dtype") or record["args"]["dtype"]


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) for every import in ``path``; name is "" for ``import module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.module or "", alias.name) for alias in node.names]
    return found


def test_benchmarks_use_public_names_and_the_shared_tiny_llava():
    """No private helper of mdgd or mdgd_kernels, nothing from tests/ (no pytest)."""
    files = sorted(BENCHMARKS.rglob("*.py"))
    assert BENCHMARKS / "mdgd_bench" / "timing.py" in files
    builders = set()
    for path in files:
        for module, name in _imports(path):
            parts = module.split(".")
            if parts[0] in ("mdgd", "mdgd_kernels"):
                private = [p for p in [*parts, name] if p.startswith("_")]
                assert not private, f"{path.name} imports {module}.{name}"
            assert parts[0] not in ("tests", "pytest", "llava_tiny"), f"{path.name}: {module}"
            if module == "mdgd.testing":
                builders.add(path.name)
        assert "sys.path" not in path.read_text(), f"{path.name} edits sys.path"
    assert {"step.py", "bench_activations.py", "leak_check.py"} <= builders


GPU_CHECK = BENCHMARKS / "gpu_check.sh"


def test_gpu_check_needs_out_and_documents_its_time_boxes():
    """The script's arguments, and docs/testing.md's table of parts and boxes, match the
    script (its --dry-run runs in .ci/run: it takes minutes, so not here)."""
    no_out = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True)
    assert no_out.returncode == 2 and "--out DIR is required" in no_out.stderr
    usage = subprocess.run(["bash", str(GPU_CHECK), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--dry-run" in usage.stdout
    script = GPU_CHECK.read_text()
    boxes = {
        name.strip('"').replace("$dtype", dtype): int(box)
        for name, box in re.findall(r"^\s*part (\S+) (\d+) ", script, re.M)
        for dtype in ("bf16", "fp16", "fp32")
    }
    assert sum(boxes.values()) == int(re.search(r"total_box=(\d+)", script).group(1)) == 480
    doc = (ROOT / "docs" / "testing.md").read_text().split("## The GPU check", 1)[1]
    for name, box in boxes.items():
        row = next((ln for ln in doc.splitlines() if ln.startswith("|") and name in ln), "")
        assert f"| {box} s" in row, f"docs/testing.md has no row giving {name} {box} s"
