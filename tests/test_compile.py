"""The three public ops under ``torch.compile(fullgraph=True)``.

A function that calls ``segment_gram``, ``segment_combine_`` and
``mdgd_direction_`` with a cached ``SegmentLayout`` and ``nonfinite="skip"``
compiles to one graph (``fullgraph=True`` raises on any graph break) on the CPU
backend and the torch backend, and gives the same bits as eager mode: on fresh
random buffers, and on buffers holding a NaN (the skipped step) without a
recompile. The compiled results are also checked against the float64 oracle.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_direction_close, assert_stats_close, make_buffers, oracle

import mdgd_kernels as mk
from mdgd_kernels import _ext

BACKENDS = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not _ext.available, reason=f"mdgd_kernels._C: {_ext.error}"),
    ),
    "torch",
]
SIZES = [65536 + 1, 1, 4097, 300]
MODES = {"mdgd": dict(mode="mdgd"), "gm": dict(mode="gm", alpha=0.3)}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16}  # NaN-safe equality


def _step(backend: str, layout: mk.SegmentLayout, options: dict):
    """Pass 1, a pass 2 with given coefficients into h_theta, then the whole op."""
    names = [f"p{i}" for i in range(layout.num_segments)]

    def step(gt, ht, gp, hp, coeffs):
        stats = mk.segment_gram(gt, ht, gp, hp, layout, backend=backend)
        mk.segment_combine_(ht, gt, gp, hp, layout, coeffs, backend=backend)
        res = mk.mdgd_direction_(
            gt, ht, gp, hp, layout, nonfinite="skip", backend=backend, names=names, **options
        )
        return stats, res

    return step


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(INT_VIEW[x.dtype]) if x.dtype in INT_VIEW else x


def _run(fn, bufs, coeffs) -> dict[str, torch.Tensor]:
    """Every output of ``fn`` by name: the statistics, the result, the four buffers."""
    out = [b.clone() for b in bufs]
    stats, res = fn(*out, coeffs)
    return {"gram": stats, **res._asdict(), **dict(zip(("gt", "ht", "gp", "hp"), out))}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_gives_eager_bits(backend, mode, seed):
    layout = mk.get_layout(SIZES, "cpu")
    step = _step(backend, layout, MODES[mode])
    compiled = torch.compile(step, fullgraph=True)
    coeffs = torch.randn(len(SIZES), 4, generator=torch.Generator().manual_seed(seed))
    for case in ("nan", "random"):  # the same graph serves both: no recompile on data
        bufs = make_buffers(SIZES, torch.bfloat16, case=case, seed=seed)
        eager = _run(step, bufs, coeffs)
        got = _run(compiled, bufs, coeffs)
        for name, value in eager.items():
            assert torch.equal(_bits(got[name]), _bits(value)), f"{name}: compiled bits differ"
        assert bool(got["skipped"]) == (case == "nan")
    # the compiled run of the random case against the float64 oracle
    assert_stats_close(got["gram"], bufs, SIZES)
    if mode == "mdgd":  # (gm's mask may flip on an ill-conditioned segment: tests/test_ops.py)
        # pass 2 wrote into h_theta before the op ran
        seen = [bufs[0], got["ht"], *bufs[2:]]
        assert_direction_close(got["gt"], oracle(seen, SIZES, **MODES[mode]), seen, SIZES)


def test_torch_backend_ops_pass_opcheck():
    sizes = [5, 1, 70]
    bufs = make_buffers(sizes, torch.float32, seed=3)
    layout = mk.get_layout(sizes, "cpu")
    torch.library.opcheck(
        torch.ops.mdgd.segment_gram_torch.default, (*bufs, layout.chunks, layout.chunk_ptr)
    )
    coeffs = torch.randn(layout.num_segments, 4)
    torch.library.opcheck(
        torch.ops.mdgd.segment_combine_torch_.default,
        (*[b.clone() for b in bufs], layout.chunks, coeffs),
    )
