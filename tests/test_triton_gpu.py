"""The Triton backend on a CUDA GPU (skipped without one)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from conftest import (  # noqa: E402
    DTYPE_IDS,
    DTYPES,
    MODES,
    assert_cos_close,
    assert_direction_close,
    assert_mask_matches,
    assert_stats_close,
    make_buffers,
    oracle,
)
from triton_cases import random_sizes  # noqa: E402

import mdgd_kernels as mk  # noqa: E402
from mdgd_kernels.layout import CHUNK  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# =========================================================================== on a GPU

cuda = pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", ["mdgd", "gm-a0.1", "gm-a0.3-noalign", "ft"], ids=str)
def test_direction_cuda(dtype, mode, seed):
    sizes = [1, 7, 129, 1025, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5] + random_sizes(100)
    bufs = make_buffers(sizes, dtype, seed=seed, device="cuda")
    out = [b.clone() for b in bufs]
    res = mk.mdgd_direction_(*out, sizes, backend="triton", **MODES[mode])
    ref = oracle([b.cpu() for b in bufs], sizes, **MODES[mode])
    cpu = [b.cpu() for b in bufs]
    assert_direction_close(out[0], ref, cpu, sizes)
    assert_cos_close(res.cos, ref, sizes)
    kw = MODES[mode]
    if kw["mode"] == "gm":
        assert_mask_matches(res, ref, sizes, kw["alpha"], kw.get("alpha_by", "elements"))
    assert_stats_close(res.stats, cpu, sizes)
    again = mk.segment_gram(*bufs, sizes, backend="triton")
    assert torch.equal(again, mk.segment_gram(*bufs, sizes, backend="triton"))


@cuda
def test_opcheck_and_compile_cuda():
    sizes = [33, 1, 200, CHUNK + 3]
    bufs = make_buffers(sizes, torch.bfloat16, seed=2, device="cuda")
    layout = mk.get_layout(sizes, "cuda")
    torch.library.opcheck(
        torch.ops.mdgd.segment_gram_triton.default, (*bufs, layout.chunks, layout.chunk_ptr)
    )
    coeffs = torch.randn(layout.num_segments, 4, device="cuda")
    torch.library.opcheck(
        torch.ops.mdgd.segment_combine_triton_.default,
        (*[b.clone() for b in bufs], layout.chunks, coeffs),
    )

    def step(gt, ht, gp, hp):
        return mk.mdgd_direction_(gt, ht, gp, hp, layout, nonfinite="skip", backend="triton").cos

    eager = [b.clone() for b in bufs]
    compiled = [b.clone() for b in bufs]
    torch.testing.assert_close(torch.compile(step)(*compiled), step(*eager))
    torch.testing.assert_close(compiled[0], eager[0])
