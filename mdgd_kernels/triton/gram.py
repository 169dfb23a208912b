"""Pass 1 in Triton: the per-segment Gram statistics (docs/math.md §3).

For every segment ``s`` and the four gradient vectors ``gt = g_theta``,
``ht = h_theta``, ``gp = g_phi``, ``hp = h_phi`` restricted to it::

    stats[s] = (gt.gt, gt.ht, ht.ht, gp.gp, gp.hp, hp.hp, gt.gp, gt.hp, ht.gp, ht.hp)

Two launches, whatever the number of segments:

1. ``gram_partials_kernel``, grid ``C`` (one program per chunk of the chunk
   table): each program streams its chunk once from the four buffers (128-bit
   loads over the chunk's aligned body, one masked block for its ragged
   edges), casts every load to float32 at once and accumulates the 10 products
   lane-wise in float32, then reduces the lanes and writes one row of
   ``partials[C, 16]``.
2. ``gram_reduce_kernel``, grid ``S``: each program sums the partial rows of its
   segment, ``chunk_ptr[s]:chunk_ptr[s + 1]``, in a fixed order (lane-wise over
   tiles of ``REDUCE_ROWS`` rows, in chunk order, then one fixed tree), so the
   statistics are the same bits on every call; no float atomics. An empty
   segment owns no chunks and gets zeros.

Dtype contract: the four buffers are flat, contiguous, of one dtype (bf16,
fp16 or fp32) and one length ``N``; ``chunks`` is int64 ``[C, 3]`` (segment,
start, length; at most ``CHUNK`` elements each), ``chunk_ptr`` int64 ``[S + 1]``.
Element offsets are int64 (buffers beyond 2**31 elements). The result is
float32 ``[S, 10]``. NaN/Inf propagate into the statistics of their segment.

Bytes moved, ``b`` = bytes per element: reads ``4 * b * N`` (8N for bf16, the
floor of docs/math.md §9) + ``24 * C`` (chunk table); writes ``40 * C`` and re-reads
``64 * C`` of partials (~0.02% of the bf16 stream); writes ``40 * S``. No host
synchronisation: sizes come from tensor shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .configs import (
    ALIGN,
    PARTIAL_STRIDE,
    REDUCE_ROWS,
    REDUCE_WARPS,
    aligned_body,
    edge_offsets,
    gram_configs,
    prune_configs,
)


@triton.jit(do_not_specialize=["num_chunks"])  # one compile for every grid size
def gram_partials_kernel(
    gt_ptr,
    ht_ptr,
    gp_ptr,
    hp_ptr,
    chunks_ptr,
    partials_ptr,
    num_chunks,  # autotune key only (the grid is exactly num_chunks programs)
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
    STRIDE: tl.constexpr,
):
    pid = tl.program_id(0)
    start = tl.load(chunks_ptr + pid * 3 + 1)
    end = start + tl.load(chunks_ptr + pid * 3 + 2)
    lo, hi = aligned_body(start, end, ALIGN)
    lanes = tl.arange(0, BLOCK)

    # The accumulators start from the ragged edges (< ALIGN elements before the body
    # and after it; one masked, unvectorised block), so the body is all wide loads.
    eo, em = edge_offsets(start, end, lo, hi, lanes, ALIGN)
    gt = tl.load(gt_ptr + eo, mask=em, other=0.0).to(tl.float32)
    ht = tl.load(ht_ptr + eo, mask=em, other=0.0).to(tl.float32)
    gp = tl.load(gp_ptr + eo, mask=em, other=0.0).to(tl.float32)
    hp = tl.load(hp_ptr + eo, mask=em, other=0.0).to(tl.float32)
    # columns: gt.gt gt.ht ht.ht gp.gp gp.hp hp.hp gt.gp gt.hp ht.gp ht.hp
    a0 = gt * gt
    a1 = gt * ht
    a2 = ht * ht
    a3 = gp * gp
    a4 = gp * hp
    a5 = hp * hp
    a6 = gt * gp
    a7 = gt * hp
    a8 = ht * gp
    a9 = ht * hp

    # Aligned body: 128-bit loads; the mask (offs < hi, hi a multiple of ALIGN) only
    # trims the last block and is constant over ALIGN lanes, so it keeps the vectors.
    for i in range(0, (hi - lo + BLOCK - 1) // BLOCK):
        offs = tl.multiple_of(lo + i * BLOCK, ALIGN) + lanes
        m = offs < hi
        gt = tl.load(gt_ptr + offs, mask=m, other=0.0).to(tl.float32)
        ht = tl.load(ht_ptr + offs, mask=m, other=0.0).to(tl.float32)
        gp = tl.load(gp_ptr + offs, mask=m, other=0.0).to(tl.float32)
        hp = tl.load(hp_ptr + offs, mask=m, other=0.0).to(tl.float32)
        a0 += gt * gt
        a1 += gt * ht
        a2 += ht * ht
        a3 += gp * gp
        a4 += gp * hp
        a5 += hp * hp
        a6 += gt * gp
        a7 += gt * hp
        a8 += ht * gp
        a9 += ht * hp

    row = partials_ptr + pid * STRIDE
    tl.store(row + 0, tl.sum(a0, axis=0))
    tl.store(row + 1, tl.sum(a1, axis=0))
    tl.store(row + 2, tl.sum(a2, axis=0))
    tl.store(row + 3, tl.sum(a3, axis=0))
    tl.store(row + 4, tl.sum(a4, axis=0))
    tl.store(row + 5, tl.sum(a5, axis=0))
    tl.store(row + 6, tl.sum(a6, axis=0))
    tl.store(row + 7, tl.sum(a7, axis=0))
    tl.store(row + 8, tl.sum(a8, axis=0))
    tl.store(row + 9, tl.sum(a9, axis=0))


gram_partials_tuned = triton.autotune(
    configs=gram_configs(),
    key=["num_chunks"],
    prune_configs_by={"early_config_prune": prune_configs},
)(gram_partials_kernel)


@triton.jit
def gram_reduce_kernel(
    partials_ptr,
    chunk_ptr_ptr,
    out_ptr,
    ROWS: tl.constexpr,
    STRIDE: tl.constexpr,
):
    s = tl.program_id(0)
    first = tl.load(chunk_ptr_ptr + s)
    last = tl.load(chunk_ptr_ptr + s + 1)
    rows = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, STRIDE)[None, :]
    acc = tl.zeros([ROWS, STRIDE], dtype=tl.float32)
    for c in range(first, last, ROWS):
        r = c + rows
        # whole 64-byte rows (128-bit loads); columns 10..15 are never written and
        # their sums never stored: the columns do not mix
        acc += tl.load(partials_ptr + r * STRIDE + cols, mask=r < last, other=0.0)
    col = tl.arange(0, STRIDE)
    tl.store(out_ptr + s * 10 + col, tl.sum(acc, axis=0), mask=col < 10)


@triton_op("mdgd::segment_gram_triton", mutates_args=())
def segment_gram(
    g_theta: torch.Tensor,
    h_theta: torch.Tensor,
    g_phi: torch.Tensor,
    h_phi: torch.Tensor,
    chunks: torch.Tensor,
    chunk_ptr: torch.Tensor,
) -> torch.Tensor:
    """Pass 1: float32 ``[S, 10]`` statistics (two launches, no host sync)."""
    num_chunks = chunks.shape[0]
    num_segments = chunk_ptr.shape[0] - 1
    device = g_theta.device
    partials = torch.empty((num_chunks, PARTIAL_STRIDE), dtype=torch.float32, device=device)
    out = torch.empty((num_segments, 10), dtype=torch.float32, device=device)
    if num_chunks > 0:  # a shape, known on the host: not a sync
        wrap_triton(gram_partials_tuned)[(num_chunks,)](
            g_theta,
            h_theta,
            g_phi,
            h_phi,
            chunks,
            partials,
            num_chunks,
            ALIGN=ALIGN,
            STRIDE=PARTIAL_STRIDE,
        )
    wrap_triton(gram_reduce_kernel)[(num_segments,)](
        partials,
        chunk_ptr,
        out,
        ROWS=REDUCE_ROWS,
        STRIDE=PARTIAL_STRIDE,
        num_warps=REDUCE_WARPS,
    )
    return out
