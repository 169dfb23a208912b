"""Pass 2 in Triton: the update direction, written in place (docs/math.md §5).

For every segment ``s`` with coefficients ``coeffs[s] = (c1, c2, c3, c4)``::

    g_theta[s] <- d = c1*gt + c2*ht + c3*gp + c4*hp

computed in float32 and rounded once to the buffers' dtype. One launch,
``combine_kernel``, grid ``C`` (one program per chunk of the chunk table).

Two coefficient rules carry the traffic savings and the bad-input policy:

* a coefficient exactly 0 means its buffer is not read (a masked load touches
  no memory and yields 0, so ``0 * NaN`` cannot leak in): ``gm`` reads only
  ``gt`` and ``ht`` of the selected segments, and a masked-out segment, row
  ``(0, 0, 0, 0)``, is written as zeros without any read;
* a row exactly ``(1, 0, 0, 0)`` means "untouched": the chunk's loop runs zero
  times and nothing is read or written, so its bits stay (``ft``, skipped steps,
  ``gm`` with ``align=False``).

Dtype contract: as pass 1 (flat contiguous bf16/fp16/fp32 buffers of one
length, int64 chunk table, int64 offsets); ``coeffs`` is float32 ``[S, 4]``.

Bytes moved, ``b`` = bytes per element, ``n_s`` = size of segment ``s``:
``sum_s n_s * b * (#nonzero coefficients of s + 1)`` over the segments not
untouched, i.e. at most ``5 * b * N`` (10N for bf16: 4 reads + 1 write, the
floor of docs/math.md §9); ``2 * b * n_s`` for a selected ``gm`` segment, ``b * n_s`` (write
only) for a masked-out one, 0 for an untouched one; plus ``24 * C + 16 * C``
for the chunk table and coefficient rows. No host synchronisation.

Pass 2 is not autotuned: it launches ``combine_kernel`` with one configuration per
element size (:func:`launch_config`). Under ``torch.compile`` Triton's autotuner
inside this in-place ``triton_op`` gave a wrong ``g_theta`` on an H200 (torch 2.11,
Triton 3.6; with ``aot_eager`` and Inductor alike, and with a single candidate
too), while the same kernel launched with a fixed configuration matched eager mode
exactly; ``torch.compiler.is_compiling()`` is False while torch 2.11 traces the op,
so the two cases cannot be told apart with a public API. Pass 2 is elementwise:
every configuration gives the same bits, only the speed differs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .configs import ALIGN, EDGE, aligned_body, combine_configs, edge_offsets, wide_configs


@triton.jit
def _direction(gt_ptr, ht_ptr, gp_ptr, hp_ptr, offs, m, c1, c2, c3, c4):
    """``c1*gt + c2*ht + c3*gp + c4*hp`` in float32; a zero coefficient skips its load.

    ``tl.where(c != 0, m, False)`` rather than ``m & (c != 0)``: the same select on
    the GPU, but Triton 3.9's interpreter cannot ``&`` a block with a scalar bool.
    """
    d = c1 * tl.load(gt_ptr + offs, mask=tl.where(c1 != 0.0, m, False), other=0.0).to(tl.float32)
    d += c2 * tl.load(ht_ptr + offs, mask=tl.where(c2 != 0.0, m, False), other=0.0).to(tl.float32)
    d += c3 * tl.load(gp_ptr + offs, mask=tl.where(c3 != 0.0, m, False), other=0.0).to(tl.float32)
    d += c4 * tl.load(hp_ptr + offs, mask=tl.where(c4 != 0.0, m, False), other=0.0).to(tl.float32)
    return d


@triton.jit(do_not_specialize=["num_chunks"])  # one compile for every grid size
def combine_kernel(
    gt_ptr,
    ht_ptr,
    gp_ptr,
    hp_ptr,
    chunks_ptr,
    coeffs_ptr,
    num_chunks,  # unused (pass 2 is not autotuned): the signature of pass 1, for the AOT test
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,
    EDGE: tl.constexpr,
):
    pid = tl.program_id(0)
    seg = tl.load(chunks_ptr + pid * 3)
    start = tl.load(chunks_ptr + pid * 3 + 1)
    end = start + tl.load(chunks_ptr + pid * 3 + 2)
    lo, hi = aligned_body(start, end, ALIGN)
    c1 = tl.load(coeffs_ptr + seg * 4)
    c2 = tl.load(coeffs_ptr + seg * 4 + 1)
    c3 = tl.load(coeffs_ptr + seg * 4 + 2)
    c4 = tl.load(coeffs_ptr + seg * 4 + 3)
    writes = (c1 != 1.0) | (c2 != 0.0) | (c3 != 0.0) | (c4 != 0.0)  # row is not (1, 0, 0, 0)
    out_ty = gt_ptr.dtype.element_ty

    lanes = tl.arange(0, BLOCK)
    # An untouched chunk runs the loop zero times: no reads, no writes.
    n_iter = tl.where(writes, (hi - lo + BLOCK - 1) // BLOCK, 0)
    for i in range(0, n_iter):
        offs = tl.multiple_of(lo + i * BLOCK, ALIGN) + lanes
        m = offs < hi
        d = _direction(gt_ptr, ht_ptr, gp_ptr, hp_ptr, offs, m, c1, c2, c3, c4)
        tl.store(gt_ptr + offs, d.to(out_ty), mask=m)

    eo, em = edge_offsets(start, end, lo, hi, tl.arange(0, EDGE), ALIGN)
    em = tl.where(writes, em, False)
    d = _direction(gt_ptr, ht_ptr, gp_ptr, hp_ptr, eo, em, c1, c2, c3, c4)
    tl.store(gt_ptr + eo, d.to(out_ty), mask=em)


@triton_op("mdgd::segment_combine_triton_", mutates_args={"g_theta"})
def segment_combine_(
    g_theta: torch.Tensor,
    h_theta: torch.Tensor,
    g_phi: torch.Tensor,
    h_phi: torch.Tensor,
    chunks: torch.Tensor,
    coeffs: torch.Tensor,
) -> None:
    """Pass 2: ``g_theta <- c1*gt + c2*ht + c3*gp + c4*hp`` per segment, in place."""
    num_chunks = chunks.shape[0]
    if num_chunks == 0:  # a shape, known on the host: not a sync
        return
    config = launch_config(g_theta.element_size())
    wrap_triton(combine_kernel)[(num_chunks,)](
        g_theta,
        h_theta,
        g_phi,
        h_phi,
        chunks,
        coeffs,
        num_chunks,
        ALIGN=ALIGN,
        EDGE=EDGE,
        num_warps=config.num_warps,
        **config.kwargs,
    )


def launch_config(element_size: int) -> triton.Config:
    """Pass 2's configuration: the first candidate whose threads load 16 bytes per buffer
    for this element size (8 bf16/fp16 or fp32 elements per thread)."""
    return wide_configs(combine_configs(), element_size)[0]
