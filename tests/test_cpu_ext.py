"""What is specific to the compiled CPU kernels (csrc/cpu, mdgd_kernels._C).

tests/test_ops.py already runs every op test on backend "cpu" once the extension
loads; here: the registration itself, bits independent of the thread count,
multi-chunk segments against the float64 oracle, the vector tails (no write past
a segment), the zero-coefficient and identity-row rules, and the C++ guards.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    AS_INT,
    DTYPE_IDS,
    DTYPES,
    assert_direction_close,
    assert_stats_close,
    bits,
    make_buffers,
    oracle,
)

import mdgd_kernels as mk
from mdgd_kernels import _ext, torch_backend
from mdgd_kernels.layout import CHUNK

pytestmark = pytest.mark.skipif(
    not _ext.available, reason=f"mdgd_kernels._C did not load: {_ext.error}"
)

OPS = ("mdgd::segment_gram", "mdgd::segment_combine_")


def _gram(bufs, layout):
    return torch.ops.mdgd.segment_gram(*bufs, layout.chunks, layout.chunk_ptr)


def _combine(bufs, layout, coeffs):
    torch.ops.mdgd.segment_combine_(*bufs, layout.chunks, coeffs)


class _threads:
    """Run a block with ``n`` intra-op threads, restoring the previous count."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def test_extension_registers_cpu_kernels():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
        # the CUDA kernels come from the other part, mdgd_kernels._C_cuda, alone
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        assert has_cuda == _ext.cuda_available, op
    assert "cpu" in mk.available_backends("cpu")
    assert mk.resolve_backend(None, torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_bits_do_not_depend_on_thread_count(dtype, seed):
    sizes = [3 * CHUNK + 1, 1, 4097, 2 * CHUNK - 1, 0, 17]
    bufs = make_buffers(sizes, dtype, seed=seed)
    layout = mk.get_layout(sizes, "cpu")
    coeffs = torch.randn(len(sizes), 4, generator=torch.Generator().manual_seed(seed))
    results = []
    for n in (1, 2):
        with _threads(n):
            stats = _gram(bufs, layout)
            out = [b.clone() for b in bufs]
            _combine(out, layout, coeffs)
        results.append((stats, out[0]))
    assert torch.equal(results[0][0], results[1][0]), "statistics depend on the thread count"
    assert torch.equal(bits(results[0][1]), bits(results[1][1])), "d depends on the thread count"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_multi_chunk_segments_match_oracle(dtype, seed):
    sizes = [3 * CHUNK - 1, 1, 3 * CHUNK, 1, 3 * CHUNK + 1, 1]
    bufs = make_buffers(sizes, dtype, seed=seed)
    out = [b.clone() for b in bufs]
    res = mk.mdgd_direction_(*out, sizes, backend="cpu")
    assert_stats_close(res.stats, bufs, sizes)
    ref = oracle(bufs, sizes)
    assert_direction_close(out[0], ref, bufs, sizes)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_tails_stay_inside_their_segment(dtype, seed):
    """Every length mod the vector step; the buffers sit inside guarded storage."""
    sizes = list(range(1, 34)) + [CHUNK + 15]
    n = sum(sizes)
    gen = torch.Generator().manual_seed(seed)
    storage = [torch.randn(n + 64, generator=gen).to(dtype) for _ in range(4)]
    bufs = [s[32 : 32 + n] for s in storage]
    layout = mk.get_layout(sizes, "cpu")
    assert_stats_close(_gram(bufs, layout), bufs, sizes)
    before = storage[0].clone()
    coeffs = torch.tensor([[0.5, -1.0, 2.0, 0.25]] * len(sizes))
    expect = bufs[0].clone()
    torch_backend.segment_combine_(expect, *bufs[1:], layout.chunks, coeffs)
    _combine(bufs, layout, coeffs)
    assert torch.equal(bits(storage[0][:32]), bits(before[:32])), "wrote before the buffer"
    assert torch.equal(bits(storage[0][-32:]), bits(before[-32:])), "wrote past the buffer"
    # FMA vs separate multiply-add differs by float32 rounding only
    torch.testing.assert_close(bufs[0].float(), expect.float(), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_zero_coefficient_buffers_are_not_read(dtype):
    sizes = [40, 33, 40, 1]
    bufs = make_buffers(sizes, dtype, seed=7)
    for b in bufs[1:]:
        b.fill_(float("nan"))
    bufs[0][40:73] = float("inf")  # segment 1 multiplies g_theta by zero
    layout = mk.get_layout(sizes, "cpu")
    coeffs = torch.tensor(
        [
            [2.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, -0.0, 0.0],
            [-0.5, -0.0, -0.0, -0.0],
            [3.0, 0.0, 0.0, 0.0],
        ]
    )
    expect = bufs[0].float().clone()
    expect[:40] *= 2.0
    expect[40:73] = 0.0
    expect[73:113] *= -0.5
    expect[113:] *= 3.0
    _combine(bufs, layout, coeffs)
    assert torch.equal(bufs[0], expect.to(dtype))
    assert torch.equal(bits(bufs[0][40:73]), torch.zeros(33, dtype=AS_INT[dtype])), "+0, not -0"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_identity_rows_keep_every_bit(dtype):
    sizes = [20, 20, 20]
    bufs = make_buffers(sizes, dtype, seed=8)
    bufs[0][:4] = torch.tensor([-0.0, float("nan"), float("-inf"), 0.0])
    bufs[0][20:24] = torch.tensor([-0.0, float("nan"), float("-inf"), 0.0])
    if dtype == torch.float32:  # a NaN payload a float round trip would lose
        bits(bufs[0])[5] = 0x7FC00123
        bits(bufs[0])[25] = 0x7FC00123
    for b in bufs[1:]:
        b[:40] = float("nan")
    layout = mk.get_layout(sizes, "cpu")
    coeffs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, -0.0, -0.0, -0.0], [1.0, 1.0, 0.0, 0.0]])
    before = bufs[0].clone()
    _combine(bufs, layout, coeffs)
    assert torch.equal(bits(bufs[0][:40]), bits(before[:40])), "identity rows must not write"
    expect = (before[40:].float() + bufs[1][40:].float()).to(dtype)
    assert torch.equal(bits(bufs[0][40:]), bits(expect)), "gt + ht is rounded once"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_gm_coefficients_match_torch_backend_bitwise(dtype, seed):
    """Rows (m, m, 0, 0) and (m, 0, 0, 0) are exact sums: both backends give the same bits."""
    sizes = [1, 100, CHUNK + 3, 31, 7]
    bufs = make_buffers(sizes, dtype, seed=seed)
    layout = mk.get_layout(sizes, "cpu")
    coeffs = torch.tensor(
        [
            [1.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 1.0, 0.0, 0.0],
            [1.0, 0.0, 0.0, 0.0],
            [0, 0, 0, 0],
        ]
    )
    got, want = bufs[0].clone(), bufs[0].clone()
    _combine([got, *bufs[1:]], layout, coeffs)
    torch_backend.segment_combine_(want, *bufs[1:], layout.chunks, coeffs)
    assert torch.equal(bits(got), bits(want))


def test_cpp_guards_reject_malformed_tables():
    sizes = [8, 8]
    bufs = make_buffers(sizes, torch.float32, seed=0)
    layout = mk.get_layout(sizes, "cpu")
    bad = layout.chunks.clone()
    bad[1, 1] = 12  # chunk runs past the end of the buffer
    with pytest.raises(RuntimeError, match="outside the buffer"):
        torch.ops.mdgd.segment_gram(*bufs, bad, layout.chunk_ptr)
    bad = layout.chunks.clone()
    bad[0, 0] = 5  # no such segment
    with pytest.raises(RuntimeError, match="names segment 5"):
        torch.ops.mdgd.segment_combine_(*bufs, bad, torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="h_theta has dtype"):
        torch.ops.mdgd.segment_gram(
            bufs[0], bufs[1].half(), *bufs[2:], layout.chunks, layout.chunk_ptr
        )
    with pytest.raises(RuntimeError, match="coeffs must be Float"):
        torch.ops.mdgd.segment_combine_(
            *bufs, layout.chunks, torch.zeros(2, 4, dtype=torch.float64)
        )
    with pytest.raises(RuntimeError, match="chunk_ptr must be non-decreasing"):
        torch.ops.mdgd.segment_gram(*bufs, layout.chunks, torch.tensor([0, 2, 1]))
