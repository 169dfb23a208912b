"""The Triton-only interpreter cases: every autotune configuration launched directly,
and the interpreter's dispatch.

Not a test file. ``triton_worker.py`` runs these ``case_*`` functions in its
``TRITON_INTERPRET=1`` subprocess, on request from ``test_triton_interp.py``
(arguments are plain picklable values); the cases every backend runs are in
``op_cases.py``. The configuration helpers are shared with the AOT test file.
"""

from __future__ import annotations

import torch
from conftest import assert_stats_close, make_buffers, same_bits
from op_cases import DTYPE_BY_ID, assert_combine_close, interpreter_truncates

import mdgd_kernels as mk


def _direct_launch_gram(bufs, layout, cfg_index: int) -> torch.Tensor:
    from mdgd_kernels.triton import configs, gram

    cfg = configs.gram_configs()[cfg_index]
    c, s = layout.num_chunks, layout.num_segments
    partials = torch.empty((c, configs.PARTIAL_STRIDE), dtype=torch.float32)
    out = torch.empty((s, 10), dtype=torch.float32)
    gram.gram_partials_kernel[(c,)](
        *bufs, layout.chunks, partials, c,
        ALIGN=configs.ALIGN, STRIDE=configs.PARTIAL_STRIDE,
        **cfg.all_kwargs(),
    )  # fmt: skip
    gram.gram_reduce_kernel[(s,)](
        partials, layout.chunk_ptr, out,
        ROWS=configs.REDUCE_ROWS, STRIDE=configs.PARTIAL_STRIDE, num_warps=configs.REDUCE_WARPS,
    )  # fmt: skip
    return out


def _config_sizes(block: int) -> list[int]:
    return [1, 7, block - 1, block, block + 1, 2 * block + 3, 5]


def case_gram_config(dtype: str, cfg_index: int, seed: int) -> None:
    from mdgd_kernels.triton import configs

    block = configs.gram_configs()[cfg_index].kwargs["BLOCK"]
    sizes = _config_sizes(block)
    bufs = make_buffers(sizes, DTYPE_BY_ID[dtype], seed=seed)
    stats = _direct_launch_gram(bufs, mk.get_layout(sizes, "cpu"), cfg_index)
    assert_stats_close(stats, bufs, sizes)


def case_combine_config(dtype: str, cfg_index: int, seed: int) -> None:
    from mdgd_kernels.triton import combine, configs

    cfg = configs.combine_configs()[cfg_index]
    sizes = _config_sizes(cfg.kwargs["BLOCK"])
    bufs = make_buffers(sizes, DTYPE_BY_ID[dtype], seed=seed)
    gen = torch.Generator().manual_seed(seed)
    coeffs = torch.randn(len(sizes), 4, generator=gen)
    coeffs[1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # untouched
    coeffs[4] = 0.0  # masked out
    coeffs[5, 1:] = 0.0  # scale only gt
    layout = mk.get_layout(sizes, "cpu")
    out = [b.clone() for b in bufs]
    combine.combine_kernel[(layout.num_chunks,)](
        *out, layout.chunks, coeffs, layout.num_chunks,
        ALIGN=configs.ALIGN, EDGE=configs.EDGE, **cfg.all_kwargs(),
    )  # fmt: skip
    assert_combine_close(
        out[0], bufs, sizes, coeffs, truncates=interpreter_truncates("triton", "cpu", out[0].dtype)
    )
    lo, hi = sizes[0], sizes[0] + sizes[1]
    assert same_bits(out[0][lo:hi], bufs[0][lo:hi]), "(1,0,0,0) must keep the bits"


def case_interpreter_dispatch() -> None:
    assert "triton" in mk.available_backends("cpu"), "TRITON_INTERPRET=1 enables it on CPU"
    assert mk.resolve_backend("triton", torch.device("cpu")) == "triton"
    from mdgd_kernels import triton as tb
    from mdgd_kernels.backends import kernels

    assert tb.available and tb.error is None
    assert kernels("triton") == (tb.segment_gram, tb.segment_combine_)
    # the ops are registered with torch and run through the dispatcher
    sizes = [5, 1, 70]
    bufs = make_buffers(sizes, torch.float32, seed=11)
    layout = mk.get_layout(sizes, "cpu")
    stats = torch.ops.mdgd.segment_gram_triton(*bufs, layout.chunks, layout.chunk_ptr)
    assert_stats_close(stats, bufs, sizes)
    out = [b.clone() for b in bufs]
    coeffs = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 3)
    assert torch.ops.mdgd.segment_combine_triton_(*out, layout.chunks, coeffs) is None
    assert_combine_close(out[0], bufs, sizes, coeffs)


def config_id(cfg) -> str:
    return f"B{cfg.kwargs['BLOCK']}w{cfg.num_warps}"


def gram_configs():
    from mdgd_kernels.triton import configs

    return configs.gram_configs()


def combine_configs():
    from mdgd_kernels.triton import configs

    return configs.combine_configs()
