"""The composed-torch backend: both passes as plain torch ops, any device.

No Python loop over segments: every element finds its segment through the chunk
table (``searchsorted`` on the chunk starts), products are reduced per segment
with ``index_add_`` in float64. The buffers are walked in slices of ``SLICE``
elements so the float64 temporaries stay bounded (about 80 bytes per element of
a slice), whatever the buffer length. It reads each buffer once per pass but
materialises float32/float64 temporaries, so it is a portable fallback and a
second, independent implementation for the tests, not a fast path. On CPU the
result is deterministic; on CUDA ``index_add_`` may reorder float64 additions.
"""

from __future__ import annotations

import torch

SLICE = 1 << 21

# Gram column -> (left buffer, right buffer); buffers 0..3 are gt, ht, gp, hp.
PAIRS = ((0, 0), (0, 1), (1, 1), (2, 2), (2, 3), (3, 3), (0, 2), (0, 3), (1, 2), (1, 3))
_LEFT = [p[0] for p in PAIRS]
_RIGHT = [p[1] for p in PAIRS]


def _segment_of(chunks: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    pos = torch.arange(lo, hi, device=chunks.device, dtype=torch.int64)
    idx = torch.searchsorted(chunks[:, 1].contiguous(), pos, right=True) - 1
    return chunks[idx, 0]


def segment_gram(
    g_theta: torch.Tensor,
    h_theta: torch.Tensor,
    g_phi: torch.Tensor,
    h_phi: torch.Tensor,
    chunks: torch.Tensor,
    chunk_ptr: torch.Tensor,
) -> torch.Tensor:
    num_segments = chunk_ptr.numel() - 1
    acc = torch.zeros(num_segments, len(PAIRS), dtype=torch.float64, device=g_theta.device)
    n = g_theta.numel()
    for lo in range(0, n, SLICE):
        hi = min(lo + SLICE, n)
        x = torch.stack([b[lo:hi] for b in (g_theta, h_theta, g_phi, h_phi)]).to(torch.float32)
        prods = (x[_LEFT] * x[_RIGHT]).to(torch.float64)  # [10, n]
        acc.index_add_(0, _segment_of(chunks, lo, hi), prods.t())
    return acc.to(torch.float32)


def segment_combine_(
    g_theta: torch.Tensor,
    h_theta: torch.Tensor,
    g_phi: torch.Tensor,
    h_phi: torch.Tensor,
    chunks: torch.Tensor,
    coeffs: torch.Tensor,
) -> None:
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0], device=coeffs.device)
    untouched = (coeffs == identity).all(dim=1)
    n = g_theta.numel()
    for lo in range(0, n, SLICE):
        hi = min(lo + SLICE, n)
        seg = _segment_of(chunks, lo, hi)
        c = coeffs[seg]  # [n, 4] float32
        d = torch.zeros(hi - lo, dtype=torch.float32, device=g_theta.device)
        for j, buf in enumerate((g_theta, h_theta, g_phi, h_phi)):
            cj = c[:, j]
            # A zero coefficient means "not read": 0 * NaN must not leak in.
            d += torch.where(cj == 0, 0.0, cj * buf[lo:hi].to(torch.float32))
        out = g_theta[lo:hi]
        out.copy_(torch.where(untouched[seg], out, d.to(out.dtype)))
