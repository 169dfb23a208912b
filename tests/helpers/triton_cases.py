"""The Triton interpreter cases: every kernel against the float64 oracle on CPU tensors.

Not a test file: ``triton_worker.py`` runs these ``case_*`` functions in its
``TRITON_INTERPRET=1`` subprocess, on request from ``test_triton_interp.py``
(arguments are plain picklable values). The layouts, the random sizes and the
configuration helpers are shared with the AOT and GPU test files.
"""

from __future__ import annotations

import re

import torch
from conftest import (
    DTYPE_IDS,
    TOL,
    assert_cos_close,
    assert_direction_close,
    assert_mask_matches,
    assert_stats_close,
    check_mask_all_tied,
    check_mask_threshold_ties,
    make_buffers,
    oracle,
)

import mdgd_kernels as mk
from mdgd_kernels.layout import CHUNK

DTYPE_BY_ID = {v: k for k, v in DTYPE_IDS.items()}


def random_sizes(n: int, seed: int = 4321) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 300, (n,), generator=gen).tolist()


# (sizes, chunk): a chunk smaller than CHUNK gives multi-chunk segments whose chunks
# start unaligned, at a cost the interpreter can afford.
LAYOUTS = {
    "1-7-129-1025": ([1, 7, 129, 1025], CHUNK),  # size 1, a prime, just above BLOCK 1024
    "blocks+-1-chunk1000": ([511, 513, 1023, 2047, 2049, 4097], 1000),  # 15 chunks
    "40segs": (random_sizes(40), CHUNK),
}
# every mode on the small layout; on the costlier ones, the modes that take distinct
# paths: 4 buffers read, 2 read + zeros written, untouched + zeros, top-alpha ranking
LAYOUT_MODES = {
    "blocks+-1-chunk1000": ("mdgd", "gm-a0.1", "gm-a0.3-noalign"),
    "40segs": ("gm-a0.1", "gm-a0.5-segments"),
}
BIG = {"chunk+-1": ([CHUNK - 1, CHUNK + 1, 3], CHUNK)}  # the real chunk size: 64 blocks/chunk
AS_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(AS_INT[a.dtype]), b.view(AS_INT[b.dtype]))


# =========================================================================== interpreter cases
# Run inside the TRITON_INTERPRET=1 worker; arguments are plain picklable values.


def _run(bufs, sizes, **kw):
    out = [b.clone() for b in bufs]
    res = mk.mdgd_direction_(*out, sizes, backend="triton", **kw)
    for name, before, after in zip(("h_theta", "g_phi", "h_phi"), bufs[1:], out[1:]):
        assert _same_bits(before, after), f"{name} was written; only g_theta may be"
    return out[0], res


def case_direction(dtype: str, sizes: list[int], chunk: int, kw: dict, seed: int) -> None:
    dt = DTYPE_BY_ID[dtype]
    bufs = make_buffers(sizes, dt, seed=seed)
    d, res = _run(bufs, mk.get_layout(sizes, "cpu", chunk=chunk), **kw)
    ref = oracle(bufs, sizes, **kw)
    assert_direction_close(d, ref, bufs, sizes)
    assert_cos_close(res.cos, ref, sizes)
    if kw.get("mode") == "gm":
        assert_mask_matches(res, ref, sizes, kw["alpha"], kw.get("alpha_by", "elements"))
    if kw.get("mode") == "ft":
        assert _same_bits(d, bufs[0]), "ft must leave g_theta's bits"
    assert bool(res.skipped) == ref.skipped
    assert_stats_close(res.stats, bufs, sizes)


def case_edge(dtype: str, case: str, kw: dict, seed: int) -> None:
    sizes = [1, 7, 129, 1025]
    dt = DTYPE_BY_ID[dtype]
    bufs = make_buffers(sizes, dt, case=case, seed=seed)
    d, res = _run(bufs, sizes, **kw)
    ref = oracle(bufs, sizes, **kw)
    assert_direction_close(d, ref, bufs, sizes)
    assert_cos_close(res.cos, ref, sizes)
    if kw.get("mode") == "gm":
        assert_mask_matches(res, ref, sizes, kw["alpha"], kw.get("alpha_by", "elements"))
    if case == "zero_h":
        assert torch.equal(res.s_theta, torch.zeros_like(res.s_theta))
    if case in ("zero_g_phi", "parallel"):
        assert torch.equal(res.k, torch.zeros_like(res.k)), "degenerate projections give k = 0"


def case_mask_ties(dtype: str, alpha_by: str, check: str, seed: int) -> None:
    checks = {"all": check_mask_all_tied, "threshold": check_mask_threshold_ties}
    checks[check](_run, alpha_by, DTYPE_BY_ID[dtype], seed)


def case_nonfinite(dtype: str, case: str, seed: int) -> None:
    sizes = [5, 1, 300, 77]
    bufs = make_buffers(sizes, DTYPE_BY_ID[dtype], case=case, seed=seed)
    out = [b.clone() for b in bufs]
    names = ["p0", "p1", "p2", "p3"]
    try:
        mk.mdgd_direction_(*out, sizes, backend="triton", names=names)
    except FloatingPointError as exc:
        assert re.search(r"segment \d+ \(p\d\)", str(exc)), str(exc)
    else:
        raise AssertionError("nonfinite='raise' did not raise")
    assert all(_same_bits(a, b) for a, b in zip(bufs, out)), "raise must write nothing"
    for mode in ("mdgd", "gm"):
        res = mk.mdgd_direction_(*out, sizes, backend="triton", nonfinite="skip", mode=mode)
        assert bool(res.skipped)
        assert all(_same_bits(a, b) for a, b in zip(bufs, out)), "skip must leave every bit"
        bad = ~res.stats.isfinite().all(1)
        assert torch.equal(bad, ~reference_finite(bufs, sizes)), "wrong segment flagged"


def reference_finite(bufs, sizes) -> torch.Tensor:
    parts = [torch.split(b.double(), sizes) for b in bufs]
    return torch.tensor(
        [all(bool(p[s].isfinite().all()) for p in parts) for s in range(len(sizes))]
    )


def case_stats_bit_identical(dtype: str, seed: int) -> None:
    sizes = [5000, 1, 999, 0, 8]
    layout = mk.get_layout(sizes, "cpu", chunk=1024)  # 5 chunks in segment 0
    bufs = make_buffers(sizes, DTYPE_BY_ID[dtype], seed=seed)
    first = mk.segment_gram(*bufs, layout, backend="triton")
    assert first.dtype == torch.float32 and first.shape == (len(sizes), 10)
    for _ in range(2):
        assert torch.equal(mk.segment_gram(*bufs, layout, backend="triton"), first)
    assert_stats_close(first, bufs, sizes)
    assert torch.equal(first[3], torch.zeros(10)), "an empty segment has zero statistics"


def case_empty(dtype: str) -> None:
    dt = DTYPE_BY_ID[dtype]
    for sizes in ([0], [0, 0], [3, 0, 5]):
        bufs = make_buffers(sizes, dt, seed=3)
        stats = mk.segment_gram(*bufs, sizes, backend="triton")
        assert_stats_close(stats, bufs, sizes)
        for s, n in enumerate(sizes):
            if n == 0:
                assert torch.equal(stats[s], torch.zeros(10))
        d, _ = _run(bufs, sizes, mode="gm", alpha=0.5)
        assert_direction_close(d, oracle(bufs, sizes, mode="gm", alpha=0.5), bufs, sizes)


def _expected_direction(bufs, sizes, coeffs):
    """float64 ``sum_j c_j x_j`` per segment (zero coefficient: not read), its term scale."""
    outs, scales = [], []
    for s, xs in enumerate(zip(*(torch.split(b.double(), sizes) for b in bufs))):
        c = coeffs[s].double().tolist()
        d = torch.zeros(sizes[s], dtype=torch.float64)
        scale = 0.0
        for cj, x in zip(c, xs):
            if cj != 0:
                d += cj * x
                scale += abs(cj) * (float(x.abs().max()) if x.numel() else 0.0)
        outs.append(d)
        scales.append(torch.full((sizes[s],), scale, dtype=torch.float64))
    return torch.cat(outs), torch.cat(scales)


def case_coefficient_rules(dtype: str, seed: int) -> None:
    """Zero coefficient = not read (NaN cannot leak); (1, 0, 0, 0) = bits untouched."""
    from mdgd_kernels import triton as tb

    dt = DTYPE_BY_ID[dtype]
    sizes = [13, 1, 130, 64, 9, 1030]
    bufs = make_buffers(sizes, dt, seed=seed)
    lo = [0]
    for n in sizes:
        lo.append(lo[-1] + n)
    nan = float("nan")
    # NaN wherever a buffer must not be read
    bufs[0][lo[0] : lo[1]] = nan  # segment 0: identity row, NaN bits must stay
    for b in bufs:
        b[lo[1] : lo[2]] = nan  # segment 1: masked-out gm row, zeros without reading
    for b in bufs[2:]:
        b[lo[2] : lo[3]] = nan  # segment 2: gm row (1, 1, 0, 0)
    bufs[1][lo[3] : lo[4]] = nan  # segment 3: (2, 0, -0.5, 0.25), ht not read
    coeffs = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [1.0, 1.0, 0.0, 0.0],
            [2.0, 0.0, -0.5, 0.25],
            [0.0, 0.0, 0.0, -3.0],
            [0.7, -1.3, 0.4, 2.2],
        ]
    )
    layout = mk.get_layout(sizes, "cpu")
    out = [b.clone() for b in bufs]
    tb.segment_combine_(*out, layout.chunks, coeffs)
    for before, after in zip(bufs[1:], out[1:]):
        assert _same_bits(before, after), "only g_theta may be written"
    d = out[0]
    assert _same_bits(d[lo[0] : lo[1]], bufs[0][lo[0] : lo[1]]), "(1,0,0,0) must keep the bits"
    assert torch.equal(d[lo[1] : lo[2]], torch.zeros(1, dtype=dt)), "(0,0,0,0) must write zeros"
    assert d[lo[1] :].isfinite().all(), "a buffer with coefficient 0 was read (NaN leaked)"
    want, scale = _expected_direction(bufs, sizes, coeffs)
    err = (d.double() - want).abs()[lo[2] :]
    assert (err <= TOL[dt] * scale[lo[2] :]).all(), f"max error {float(err.max())}"


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
    dt = DTYPE_BY_ID[dtype]
    bufs = make_buffers(sizes, dt, seed=seed)
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
    want, scale = _expected_direction(bufs, sizes, coeffs)
    err = (out[0].double() - want).abs()
    assert (err <= TOL[dt] * scale).all(), f"max error {float(err.max())}"
    lo, hi = sizes[0], sizes[0] + sizes[1]
    assert _same_bits(out[0][lo:hi], bufs[0][lo:hi]), "(1,0,0,0) must keep the bits"


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
    want, scale = _expected_direction(bufs, sizes, coeffs)
    assert ((out[0].double() - want).abs() <= TOL[torch.float32] * scale).all()


def config_id(cfg) -> str:
    return f"B{cfg.kwargs['BLOCK']}w{cfg.num_warps}"


def gram_configs():
    from mdgd_kernels.triton import configs

    return configs.gram_configs()


def combine_configs():
    from mdgd_kernels.triton import configs

    return configs.combine_configs()
