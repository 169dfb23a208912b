"""Faults across 2 gloo ranks: a NaN on one rank only makes every rank skip (or raise),
with identical parameters, in "dp" and "fsdp" mode; a rank dying mid-step makes the
other raise within dist_timeout_s naming the collective (scenarios: tests/dist_faults.py)."""

from __future__ import annotations

import json

import pytest
import torch
from dist_faults import TIMEOUT_S, assert_fault_handled
from launch import WORLD, launch

CASES = [(d, n, f) for d in ("dp", "fsdp") for n in ("skip", "raise") for f in ("grad", "loss")]


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults")
    launch("faults", out, timeout=300)
    return [torch.load(out / f"faults-{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_nan_on_one_rank_skips_or_raises_on_every_rank(faults, case):
    dmode, nonfinite, fault = case
    assert_fault_handled([f[case] for f in faults], nonfinite)


@pytest.mark.parametrize("dmode", ["dp", "fsdp"])
def test_a_dead_rank_makes_the_other_raise_naming_the_collective(tmp_path, dmode):
    launch(f"dies_{dmode}", tmp_path, timeout=120)
    got = json.loads((tmp_path / f"dies_{dmode}-0.json").read_text())
    # under FSDP2 a micro-batch starts with the all-reduce of the ranks' text-only flags,
    # the first collective that misses the dead rank
    collective = {"dp": "reduction of", "fsdp": "all-reduce of the text-only flags"}
    assert collective[dmode] in got["message"] and "did not complete" in got["message"], got
    assert got["seconds"] < TIMEOUT_S + 5, got
