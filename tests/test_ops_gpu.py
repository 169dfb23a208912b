"""The shared op cases on a CUDA GPU, for backends ``triton`` and ``cuda`` (skipped
without a GPU).

The same ``op_cases.py`` list that tests/test_ops.py runs for ``cpu`` and ``torch`` and
tests/test_triton_interp.py for ``triton`` in the interpreter, with the buffers on the
GPU and the float64 oracle on host copies. A backend that is not available on the
GPU (triton not installed, ``mdgd_kernels._C_cuda`` not built) skips with the
reason. The Triton-only GPU checks are in tests/test_triton_gpu.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES
from op_cases import CASE_IDS, CASES, LARGE_CASE_IDS, LARGE_CASES, opcheck_ops, run_case

import mdgd_kernels as mk

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(
    INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU"
)


def _require(backend: str) -> None:
    try:
        mk.resolve_backend(backend, torch.device("cuda"))
    except (ImportError, RuntimeError) as exc:
        pytest.skip(f"backend {backend!r} is not available: {exc}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", CASES + LARGE_CASES, ids=CASE_IDS + LARGE_CASE_IDS)
def test_op_case_gpu(case, backend, seed):
    _require(backend)
    run_case(case, backend, "cuda", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_opcheck_cuda_kernels(dtype):
    _require("cuda")
    opcheck_ops(
        torch.ops.mdgd.segment_gram.default, torch.ops.mdgd.segment_combine_.default, "cuda", dtype
    )
