"""The Triton backend in the interpreter, on CPU tensors under ``TRITON_INTERPRET=1``.

Every shared op case of ``op_cases.py`` through the public API (``backend="triton"``),
as ``tests/test_ops.py`` runs them for ``cpu`` and ``torch``; then what only Triton
has: every autotune configuration launched directly, and the interpreter's dispatch
(``triton_cases.py``). All of it runs in one worker subprocess (``triton_worker.py``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from conftest import DTYPE_IDS  # noqa: E402
from op_cases import CASE_IDS, CASES  # noqa: E402
from triton_cases import combine_configs, gram_configs  # noqa: E402
from triton_worker import Worker  # noqa: E402


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_op_case_interp(worker, case, backend, seed):
    worker.run("op_cases.run_case", case=case, backend=backend, device="cpu", seed=seed)


CONFIGS = {"gram": gram_configs, "combine": combine_configs}


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("cfg_index", range(4), ids=lambda i: f"cfg{i}")
@pytest.mark.parametrize("kernel", CONFIGS)
def test_every_config_interp(worker, kernel, cfg_index, dtype, seed):
    """Each autotune configuration of each pass, launched directly (``triton_cases``)."""
    if cfg_index >= len(CONFIGS[kernel]()):
        pytest.skip("no such configuration")
    worker.run(f"triton_cases.case_{kernel}_config", dtype=dtype, cfg_index=cfg_index, seed=seed)


def test_interpreter_dispatch(worker):
    worker.run("triton_cases.case_interpreter_dispatch")
