"""Launch configurations of the Triton kernels, and the chunk geometry both passes share.

Both passes are streaming, memory-bound loops: one program walks one chunk (at
most ``CHUNK = 65536`` elements) in blocks of ``BLOCK`` elements. What matters is
the number of bytes in flight per SM, which ``BLOCK`` x ``num_warps`` x programs
per SM sets, bounded by the register file: pass 1 keeps 10 float32 accumulators
per lane, so it is held to 4..8 elements per thread (8 x 10 accumulators + 4 x 8
loaded values: ~120 registers, no spills; the AOT test checks it). Pass 2 keeps
only the loaded values and ``d``, so it can afford 8..16 per thread. For each
dtype only the candidates whose threads load at least 16 bytes per buffer (one
128-bit load) are kept: 8 bf16/fp16 or 4 fp32 elements per thread.
The candidate sets are sized for A100 (sm_80, 108 SMs, 2.0 TB/s) and H100
(sm_90, 132 SMs, 3.35 TB/s): with ~600 ns of DRAM latency, Little's law asks for
about 11 KB (A100) and 15 KB (H100) of loads in flight per SM; at its
register-limited occupancy every candidate issues about 30 KB or more per SM per
loop step, so all of them can saturate either part, and the autotuner picks
among them (CTA size vs. CTAs per SM, tail effects) on the machine at hand.

The autotune key is ``num_chunks`` (the grid size; the tensor dtypes are added to
the key by Triton itself). Under ``TRITON_INTERPRET=1`` there is nothing to time,
and with ``MDGD_TRITON_AUTOTUNE=0`` the first (default) configuration is used
without benchmarking: the statistics' rounding depends on ``BLOCK`` and
``num_warps`` (the in-chunk reduction tree), so pinning the configuration gives
the same bits across processes as well as across calls.

Chunk geometry (why loads are wide although chunk starts are arbitrary): a chunk
``[start, end)`` is cut into an aligned body ``[lo, hi)`` with ``lo`` and ``hi``
multiples of ``ALIGN = 8`` elements (16 bytes of bf16/fp16, 32 of fp32), walked
with 128-bit vector loads, and two ragged edges of fewer than 8 elements each
(``[start, min(lo, end))`` and ``[hi, end)``), handled by one masked block
(pass 1 starts its accumulators from it; pass 2 uses ``EDGE = 16`` lanes). The
hints ``tl.multiple_of`` on ``lo + i * BLOCK`` and on ``hi`` make the masks
constant over 8 lanes, which is what lets Triton vectorise masked loads.

Few ``@triton.jit`` helper calls per program (``tl.sum`` is one): the interpreter
re-patches ``triton.language`` on every such call, which dominates its run time.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

ALIGN = 8
"""Elements per aligned group: 16 bytes of bf16/fp16 (one 128-bit load), 32 of fp32."""
EDGE = 16
"""Lanes of pass 2's masked edge block: up to 7 head + up to 7 tail elements."""
PARTIAL_STRIDE = 16
"""Columns of a row of the ``[C, 16]`` float32 partials (10 used, 64-byte rows)."""
REDUCE_ROWS = 64
"""Chunk partials summed per step by the segment reduction (fixed: see below)."""
REDUCE_WARPS = 4
"""The segment reduction is not autotuned: its summation tree depends on its
configuration, and the statistics must be the same bits on every call."""


def gram_configs() -> list[triton.Config]:
    """Pass-1 candidates, (BLOCK, num_warps): 4 or 8 elements per thread.

    The first is the default (interpreter, ``MDGD_TRITON_AUTOTUNE=0``); the
    4-per-thread ones only serve fp32 (see :func:`prune_configs`).
    """
    return [
        triton.Config({"BLOCK": 1024}, num_warps=4),  # 8/thread: ~120 regs, 4 CTAs/SM
        triton.Config({"BLOCK": 2048}, num_warps=8),  # 8/thread, larger CTA
        triton.Config({"BLOCK": 1024}, num_warps=8),  # 4/thread (fp32): ~77 regs, 3 CTAs/SM
        triton.Config({"BLOCK": 512}, num_warps=4),  # 4/thread (fp32): 6 CTAs/SM, short chunks
    ]


def combine_configs() -> list[triton.Config]:
    """Pass-2 candidates, (BLOCK, num_warps): 8 or 16 elements per thread (~30-90 regs)."""
    return [
        triton.Config({"BLOCK": 2048}, num_warps=8),  # 8/thread
        triton.Config({"BLOCK": 2048}, num_warps=4),  # 16/thread: two 128-bit loads per buffer
        triton.Config({"BLOCK": 4096}, num_warps=8),  # 16/thread, larger CTA
        triton.Config({"BLOCK": 1024}, num_warps=4),  # 8/thread, more CTAs resident
    ]


def elements_per_thread(config: triton.Config) -> int:
    return config.kwargs["BLOCK"] // (32 * config.num_warps)


def wide_configs(configs: list[triton.Config], element_size: int) -> list[triton.Config]:
    """The configurations whose threads load at least 16 bytes (one 128-bit load) per buffer."""
    return [c for c in configs if elements_per_thread(c) * element_size >= 16]


def autotune_enabled() -> bool:
    """Benchmark the candidates (the default), unless interpreting or switched off."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return os.environ.get("MDGD_TRITON_AUTOTUNE", "1") != "0"


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """``early_config_prune``: the wide-load candidates for the buffers' dtype (all
    of them, or only the first when not autotuning)."""
    element_size = getattr(named_args.get("gt_ptr"), "element_size", None)
    if element_size is not None:
        configs = wide_configs(configs, element_size()) or configs
    return list(configs) if autotune_enabled() else list(configs[:1])


@triton.jit
def aligned_body(start, end, ALIGN: tl.constexpr):
    """The ALIGN-aligned body ``[lo, hi)`` of the chunk ``[start, end)`` (int64).

    Takes values, not the chunk-table pointer: torch's kernel-mutation analysis
    follows the arguments of a helper call feeding a store address, and would
    otherwise report the chunk table as written (and clone it under torch.compile).
    """
    lo = tl.multiple_of((start + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
    hi = tl.multiple_of(tl.maximum(end // ALIGN * ALIGN, lo), ALIGN)
    return lo, hi


@triton.jit
def edge_offsets(start, end, lo, hi, lanes, ALIGN: tl.constexpr):
    """Offsets and mask of the ragged edges of a chunk, on the lanes ``lanes``.

    Lanes ``0..ALIGN-1`` take the head ``[start, min(lo, end))``, lanes
    ``ALIGN..2*ALIGN-1`` the tail ``[hi, end)`` (each holds fewer than ``ALIGN``
    elements); any further lanes are masked off.
    """
    head = lanes < ALIGN
    offs = tl.where(head, start + lanes, hi + (lanes - ALIGN))
    mask = tl.where(head, offs < tl.minimum(lo, end), (lanes < 2 * ALIGN) & (offs < end))
    return offs, mask
