"""The Triton backend (``mdgd_kernels/triton``), without a GPU.

1. Interpreter: every kernel against the float64 oracle on CPU tensors under
   ``TRITON_INTERPRET=1``, through the public API (``backend="triton"``) and, for
   every autotune configuration, by direct launches.
2. Ahead of time: every kernel, at every autotune configuration and dtype,
   compiled for sm_80 (A100) and sm_90 (H100) with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; the
   registers, shared memory and spills of each are printed (``pytest -s``) and a
   spill, a narrow body load or an atomic fails the test.
3. torch.compile's view: the ``triton_op``s decompose into ``wrap_triton`` kernel
   nodes that mutate exactly what the schemas say (fake CUDA tensors, no GPU).

``triton.jit`` picks "interpreted or compiled" when a kernel is decorated, from
``TRITON_INTERPRET``, so the interpreter cases cannot share this process with the
AOT tests (nor should the variable leak into other test files). They run in one
worker subprocess, started with ``TRITON_INTERPRET=1`` by running this file as a
script (``--serve``): each parametrised test sends it one ``case_*`` function by
name and re-raises its failure here, so every case is still reported on its own.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import select
import struct
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import (  # noqa: E402
    CASES,
    DTYPE_IDS,
    DTYPES,
    MODES,
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

import mdgd_kernels as mk  # noqa: E402
from mdgd_kernels.layout import CHUNK  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPE_BY_ID = {v: k for k, v in DTYPE_IDS.items()}


def _random_sizes(n: int, seed: int = 4321) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 300, (n,), generator=gen).tolist()


# (sizes, chunk): a chunk smaller than CHUNK gives multi-chunk segments whose chunks
# start unaligned, at a cost the interpreter can afford.
LAYOUTS = {
    "1-7-129-1025": ([1, 7, 129, 1025], CHUNK),  # size 1, a prime, just above BLOCK 1024
    "blocks+-1-chunk1000": ([511, 513, 1023, 2047, 2049, 4097], 1000),  # 15 chunks
    "40segs": (_random_sizes(40), CHUNK),
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


# =========================================================================== the worker


class _Worker:
    """One ``TRITON_INTERPRET=1`` subprocess running ``case_*`` functions on request."""

    TIMEOUT_S = 300

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), str(HERE), env.get("PYTHONPATH", "")) if p
        )
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=str(REPO),
        )

    def run(self, name: str, **kwargs) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        _send(self.proc.stdin, (name, kwargs))
        ready, _, _ = select.select([self.proc.stdout], [], [], self.TIMEOUT_S)
        if not ready:
            self.close()
            pytest.fail(f"interpreter case {name} timed out after {self.TIMEOUT_S}s", pytrace=False)
        try:
            ok, text = _recv(self.proc.stdout)
        except EOFError:
            self.close()
            pytest.fail(f"the interpreter worker died running {name}", pytrace=False)
        if text:
            print(text, end="")
        if not ok:
            pytest.fail(f"interpreter case {name}({kwargs}) failed:\n{text}", pytrace=False)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _recv(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(stream.read(n))


def _serve() -> None:
    """Worker loop: requests on stdin, replies on the original stdout; prints go to stderr."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = sys.stdin.buffer
    while True:
        try:
            name, kwargs = _recv(requests)
        except EOFError:
            return
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                globals()[name](**kwargs)
            _send(replies, (True, buf.getvalue()))
        except BaseException:  # report everything, including pytest.fail/skip exceptions
            _send(replies, (False, buf.getvalue() + traceback.format_exc()))


@pytest.fixture(scope="module")
def worker():
    w = _Worker()
    yield w
    w.close()


# =========================================================================== interpreter tests


DIRECTION_CASES = [
    (layout, mode)
    for layout in LAYOUTS
    for mode in MODES
    if mode in LAYOUT_MODES.get(layout, MODES)
]


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize(("layout", "mode"), DIRECTION_CASES, ids=str)
def test_direction_interp(worker, dtype, layout, mode, seed):
    sizes, chunk = LAYOUTS[layout]
    worker.run("case_direction", dtype=dtype, sizes=sizes, chunk=chunk, kw=MODES[mode], seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("layout", BIG, ids=str)
def test_direction_chunk_boundary_interp(worker, dtype, layout, seed):
    sizes, chunk = BIG[layout]
    worker.run("case_direction", dtype=dtype, sizes=sizes, chunk=chunk, kw=MODES["mdgd"], seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("case", [c for c in CASES if c not in ("nan", "inf")])
@pytest.mark.parametrize("mode", ["mdgd", "gm-a0.5-segments"], ids=str)
def test_edge_cases_interp(worker, dtype, case, mode, seed):
    worker.run("case_edge", dtype=dtype, case=case, kw=MODES[mode], seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("case", ["nan", "inf"])
def test_nonfinite_policies_interp(worker, dtype, case, seed):
    worker.run("case_nonfinite", dtype=dtype, case=case, seed=seed)


@pytest.mark.parametrize("alpha_by", ["elements", "segments"])
@pytest.mark.parametrize("check", ["all", "threshold"])
def test_gm_mask_ties_interp(worker, alpha_by, check, seed):
    worker.run("case_mask_ties", dtype="bf16", alpha_by=alpha_by, check=check, seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
def test_statistics_bit_identical_interp(worker, dtype, seed):
    worker.run("case_stats_bit_identical", dtype=dtype, seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
def test_empty_segments_interp(worker, dtype):
    worker.run("case_empty", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
def test_coefficient_rules_interp(worker, dtype, seed):
    worker.run("case_coefficient_rules", dtype=dtype, seed=seed)


def _config_id(cfg) -> str:
    return f"B{cfg.kwargs['BLOCK']}w{cfg.num_warps}"


def _gram_configs():
    from mdgd_kernels.triton import configs

    return configs.gram_configs()


def _combine_configs():
    from mdgd_kernels.triton import configs

    return configs.combine_configs()


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("cfg_index", range(4), ids=lambda i: f"cfg{i}")
def test_every_gram_config_interp(worker, dtype, cfg_index, seed):
    if cfg_index >= len(_gram_configs()):
        pytest.skip("no such configuration")
    worker.run("case_gram_config", dtype=dtype, cfg_index=cfg_index, seed=seed)


@pytest.mark.parametrize("dtype", DTYPE_IDS.values())
@pytest.mark.parametrize("cfg_index", range(4), ids=lambda i: f"cfg{i}")
def test_every_combine_config_interp(worker, dtype, cfg_index, seed):
    if cfg_index >= len(_combine_configs()):
        pytest.skip("no such configuration")
    worker.run("case_combine_config", dtype=dtype, cfg_index=cfg_index, seed=seed)


def test_interpreter_dispatch(worker):
    worker.run("case_interpreter_dispatch")


# =========================================================================== AOT compilation

ARCHS = {"sm80": 80, "sm90": 90}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _signature(kernel: str, dtype: torch.dtype) -> dict[str, str]:
    t = f"*{TRITON_TYPES[dtype]}"
    if kernel == "gram_reduce":
        return {"partials_ptr": "*fp32", "chunk_ptr_ptr": "*i64", "out_ptr": "*fp32"}
    last = "partials_ptr" if kernel == "gram_partials" else "coeffs_ptr"
    return {
        "gt_ptr": t,
        "ht_ptr": t,
        "gp_ptr": t,
        "hp_ptr": t,
        "chunks_ptr": "*i64",
        last: "*fp32",
        "num_chunks": "i32",  # do_not_specialize: no divisibility attribute
    }


def _aot_cases():
    """(kernel, dtype, config) for every autotune configuration and dtype."""
    from mdgd_kernels.triton import configs

    cases = []
    for dtype in DTYPES:
        cases += [("gram_partials", dtype, cfg) for cfg in configs.gram_configs()]
        cases += [("combine", dtype, cfg) for cfg in configs.combine_configs()]
    reduce_cfg = triton.Config({}, num_warps=configs.REDUCE_WARPS)
    cases.append(("gram_reduce", torch.float32, reduce_cfg))  # dtype-independent (partials)
    return cases


def _launched(kernel: str, dtype: torch.dtype, cfg) -> bool:
    """Whether the autotuner keeps ``cfg`` for ``dtype`` (16+ bytes per thread and buffer)."""
    from mdgd_kernels.triton import configs

    if kernel == "gram_reduce":
        return True
    size = torch.empty(0, dtype=dtype).element_size()
    return bool(configs.wide_configs([cfg], size))


def _aot_id(case) -> str:
    kernel, dtype, cfg = case
    cid = _config_id(cfg) if "BLOCK" in cfg.kwargs else f"w{cfg.num_warps}"
    return f"{kernel}-{DTYPE_IDS[dtype]}-{cid}"


def _kernel_and_constexprs(kernel: str, cfg):
    from mdgd_kernels.triton import combine, configs, gram

    if kernel == "gram_partials":
        consts = dict(cfg.kwargs, ALIGN=configs.ALIGN, STRIDE=configs.PARTIAL_STRIDE)
        return gram.gram_partials_kernel, consts
    if kernel == "combine":
        return combine.combine_kernel, dict(cfg.kwargs, ALIGN=configs.ALIGN, EDGE=configs.EDGE)
    consts = {"ROWS": configs.REDUCE_ROWS, "STRIDE": configs.PARTIAL_STRIDE}
    return gram.gram_reduce_kernel, consts


def _ptxas_report(ptx: str, arch: int) -> dict[str, int]:
    """Registers, stack and spills from ``ptxas -v``, run as Triton runs it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [
            get_ptxas(arch).path,
            "-v",
            "-lineinfo",
            "--regAllocOptLevel=2",
            f"--gpu-name={sm_arch_from_capability(arch)}",
            str(src),
            "-o",
            str(Path(tmp) / "kernel.cubin"),
        ]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    assert regs and spills and stack, f"unexpected ptxas output:\n{log}"
    return {
        "regs": int(regs.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "stack": int(stack.group(1)),
    }


@pytest.fixture(scope="module")
def aot_table():
    rows: list[str] = []
    yield rows
    if rows:
        head = f"{'kernel':<40} {'arch':<5} {'regs':>4} {'smem B':>6} {'spill st/ld B':>13}"
        print(f"\n\nTriton kernels compiled ahead of time (ptxas -v):\n{head} {'stack B':>7}")
        print("\n".join(sorted(rows)))


needs_jit = pytest.mark.skipif(
    INTERPRETING, reason="TRITON_INTERPRET=1 in this process: kernels are not JITFunctions"
)


@needs_jit
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")  # compiled as launched: default
@pytest.mark.parametrize("arch", ARCHS, ids=str)
@pytest.mark.parametrize("case", _aot_cases(), ids=_aot_id)
def test_aot_compile_no_spills(case, arch, aot_table):
    from triton.backends.compiler import GPUTarget

    kernel, dtype, cfg = case
    fn, consts = _kernel_and_constexprs(kernel, cfg)
    sig = _signature(kernel, dtype)
    # pointers are 16-byte aligned, as Triton specialises them at launch for torch buffers
    attrs = {
        (fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in sig.items() if v[0] == "*"
    }
    src = triton.compiler.ASTSource(
        fn=fn,
        signature={**sig, **dict.fromkeys(consts, "constexpr")},
        constexprs=consts,
        attrs=attrs,
    )
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32), options=options)
    ptx = compiled.asm["ptx"]
    rep = _ptxas_report(ptx, ARCHS[arch])
    launched = _launched(kernel, dtype, cfg)
    row = (
        f"{_aot_id(case):<40} {arch:<5} {rep['regs']:>4} {compiled.metadata.shared:>6} "
        f"{rep['spill_stores']:>6}/{rep['spill_loads']:<6} {rep['stack']:>7}"
        + ("" if launched else "  (pruned for this dtype: < 16 B/thread)")
    )
    aot_table.append(row)
    print(row)
    assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, f"register spills: {row}"
    assert rep["regs"] <= 255
    assert not re.search(r"^\s*(atom|red)\.", ptx, re.M), "atomics in a deterministic kernel"
    if not launched:
        return
    # wide loads: the aligned body streams with 128-bit vector loads (and stores)
    assert "ld.global.v4" in ptx, "no 128-bit global load in the PTX: the body is not vectorised"
    if kernel == "combine":
        assert "st.global.v4" in ptx, "no 128-bit global store in the PTX"


# =========================================================================== torch integration


class _StubTarget:
    """Enough of a Triton driver for torch's kernel analysis to build TTIR without a GPU."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


@needs_jit
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_ops_decompose_for_torch_compile(dtype):
    """AOTAutograd (torch.compile's front end) sees the kernels and their exact mutations."""
    from torch._functorch.aot_autograd import aot_export_module
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mdgd_kernels import triton as tb  # noqa: F401  (registers the ops)

    class Step(torch.nn.Module):
        def forward(self, gt, ht, gp, hp, chunks, chunk_ptr, coeffs):
            stats = torch.ops.mdgd.segment_gram_triton(gt, ht, gp, hp, chunks, chunk_ptr)
            torch.ops.mdgd.segment_combine_triton_(gt, ht, gp, hp, chunks, coeffs)
            return (stats,)

    with FakeTensorMode():
        bufs = [torch.empty(1000, device="cuda", dtype=dtype) for _ in range(4)]
        args = (
            *bufs,
            torch.empty(3, 3, dtype=torch.int64, device="cuda"),
            torch.empty(4, dtype=torch.int64, device="cuda"),
            torch.empty(3, 4, device="cuda"),
        )
    driver = triton.runtime.driver
    previous = driver._active
    driver.set_active(_StubTarget())
    try:
        graph, sig = aot_export_module(Step(), args, trace_joint=False)
    finally:
        driver.set_active(previous)
    # what each kernel writes, from torch's analysis of its TTIR (it clones exactly that)
    written = sorted(
        sorted(node.kwargs["tensors_to_clone"])
        for node in graph.graph.nodes
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target)
    )
    assert written == [["gt_ptr"], ["out_ptr"], ["partials_ptr"]], written
    assert list(sig.user_inputs_to_mutate.values()) == [sig.user_inputs[0]], "only g_theta"
    (out,) = [n for n in graph.graph.nodes if n.op == "output"]
    stats_meta = out.args[0][-1].meta["val"]
    assert stats_meta.shape == (3, 10) and stats_meta.dtype == torch.float32


def test_missing_triton_is_reported():
    """Without triton the package imports, ``available`` is False and asking fails clearly."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, mdgd_kernels as mk\n"
        "from mdgd_kernels import triton as tb\n"
        "assert not tb.available and isinstance(tb.error, ImportError), tb.error\n"
        "assert 'triton' not in mk.available_backends('cuda')\n"
        "try:\n"
        "    mk.resolve_backend('triton', torch.device('cuda'))\n"
        "except RuntimeError as e:\n"
        "    assert 'unavailable' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "try:\n"
        "    tb.segment_gram()\n"
        "except RuntimeError as e:\n"
        "    print('ok')\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


# =========================================================================== on a GPU

cuda = pytest.mark.skipif(INTERPRETING or not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("mode", ["mdgd", "gm-a0.1", "gm-a0.3-noalign", "ft"], ids=str)
def test_direction_cuda(dtype, mode, seed):
    sizes = [1, 7, 129, 1025, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5] + _random_sizes(100)
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


if __name__ == "__main__" and "--serve" in sys.argv:
    _serve()
