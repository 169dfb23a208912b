"""The Triton kernels ahead of time and under torch.compile, without a GPU.

1. Every kernel, at every autotune configuration and dtype, compiled for sm_80
   (A100) and sm_90 (H100) with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; the
   registers, shared memory and spills of each are printed (``pytest -s``) and a
   spill, a narrow body load or an atomic fails the test.
2. torch.compile's view: the ``triton_op``s decompose into ``wrap_triton`` kernel
   nodes that mutate exactly what the schemas say (fake CUDA tensors, no GPU).
3. Without triton installed, the package still imports and says so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import DTYPE_IDS, DTYPES  # noqa: E402
from triton_cases import config_id  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

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
    cid = config_id(cfg) if "BLOCK" in cfg.kwargs else f"w{cfg.num_warps}"
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
