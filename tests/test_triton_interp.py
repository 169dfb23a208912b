"""The Triton backend in the interpreter: every kernel against the float64 oracle.

On CPU tensors under ``TRITON_INTERPRET=1``, through the public API
(``backend="triton"``) and, for every autotune configuration, by direct launches.
The cases (``triton_cases.py``) run in one worker subprocess (``triton_worker.py``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from conftest import CASES, DTYPE_IDS, MODES  # noqa: E402
from triton_cases import BIG, LAYOUT_MODES, LAYOUTS, combine_configs, gram_configs  # noqa: E402
from triton_worker import Worker  # noqa: E402


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


DIRECTION_CASES = [
    (layout, mode)
    for layout in LAYOUTS
    for mode in MODES
    if mode in LAYOUT_MODES.get(layout, MODES)
]


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize(("layout", "mode"), DIRECTION_CASES, ids=str)
def test_direction_interp(worker, dtype, layout, mode, seed):
    sizes, chunk = LAYOUTS[layout]
    worker.run("case_direction", dtype=dtype, sizes=sizes, chunk=chunk, kw=MODES[mode], seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("layout", BIG, ids=str)
def test_direction_chunk_boundary_interp(worker, dtype, layout, seed):
    sizes, chunk = BIG[layout]
    worker.run("case_direction", dtype=dtype, sizes=sizes, chunk=chunk, kw=MODES["mdgd"], seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("case", [c for c in CASES if c not in ("nan", "inf")])
@pytest.mark.parametrize("mode", ["mdgd", "gm-a0.5-segments"], ids=str)
def test_edge_cases_interp(worker, dtype, case, mode, seed):
    worker.run("case_edge", dtype=dtype, case=case, kw=MODES[mode], seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("case", ["nan", "inf"])
def test_nonfinite_policies_interp(worker, dtype, case, seed):
    worker.run("case_nonfinite", dtype=dtype, case=case, seed=seed)


@pytest.mark.parametrize("alpha_by", ["elements", "segments"])
@pytest.mark.parametrize("check", ["all", "threshold"])
def test_gm_mask_ties_interp(worker, alpha_by, check, seed):
    worker.run("case_mask_ties", dtype="bf16", alpha_by=alpha_by, check=check, seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
def test_statistics_bit_identical_interp(worker, dtype, seed):
    worker.run("case_stats_bit_identical", dtype=dtype, seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
def test_empty_segments_interp(worker, dtype):
    worker.run("case_empty", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
def test_coefficient_rules_interp(worker, dtype, seed):
    worker.run("case_coefficient_rules", dtype=dtype, seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("cfg_index", range(4), ids=lambda i: f"cfg{i}")
def test_every_gram_config_interp(worker, dtype, cfg_index, seed):
    if cfg_index >= len(gram_configs()):
        pytest.skip("no such configuration")
    worker.run("case_gram_config", dtype=dtype, cfg_index=cfg_index, seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("cfg_index", range(4), ids=lambda i: f"cfg{i}")
def test_every_combine_config_interp(worker, dtype, cfg_index, seed):
    if cfg_index >= len(combine_configs()):
        pytest.skip("no such configuration")
    worker.run("case_combine_config", dtype=dtype, cfg_index=cfg_index, seed=seed)


def test_interpreter_dispatch(worker):
    worker.run("case_interpreter_dispatch")
