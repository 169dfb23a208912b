"""The op benchmark runs, measures and saves machine-readable rows (no timing asserts)."""

from __future__ import annotations

import json

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
