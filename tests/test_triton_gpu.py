"""What only the Triton backend has on a CUDA GPU (skipped without one): its
``triton_op`` registrations under opcheck and torch.compile. The shared op cases run
on the GPU in tests/test_ops_gpu.py."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from conftest import make_buffers  # noqa: E402
from op_cases import opcheck_ops  # noqa: E402

import mdgd_kernels as mk  # noqa: E402
from mdgd_kernels.layout import CHUNK  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

cuda = pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_opcheck_and_compile_cuda():
    # registers the triton ops (imported on first use): run alone, as benchmarks/gpu_check.sh
    # once did, torch.ops.mdgd.segment_gram_triton did not exist yet (AttributeError)
    mk.resolve_backend("triton", torch.device("cuda"))
    sizes = [33, 1, 200, CHUNK + 3]
    opcheck_ops(
        torch.ops.mdgd.segment_gram_triton.default,
        torch.ops.mdgd.segment_combine_triton_.default,
        "cuda",
        torch.bfloat16,
        sizes,
    )
    bufs = make_buffers(sizes, torch.bfloat16, seed=2, device="cuda")
    layout = mk.get_layout(sizes, "cuda")

    def step(gt, ht, gp, hp):
        return mk.mdgd_direction_(gt, ht, gp, hp, layout, nonfinite="skip", backend="triton").cos

    eager = [b.clone() for b in bufs]
    compiled = [b.clone() for b in bufs]
    torch.testing.assert_close(torch.compile(step)(*compiled), step(*eager))
    torch.testing.assert_close(compiled[0], eager[0])
