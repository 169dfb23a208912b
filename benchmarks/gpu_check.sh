#!/usr/bin/env bash
# One prepared GPU check: everything this project wants to know from a short loan of one
# H100/H200, in one command, in at most 8 minutes, with every result under --out.
#
#   bash benchmarks/gpu_check.sh --out DIR            # on the GPU machine (no network needed)
#   bash benchmarks/gpu_check.sh --dry-run --out DIR  # the same plan on the CPU, tiny sizes
#
# Parts, in order, each in its own time box (seconds; a part that fails or runs out of
# time is recorded and the next one runs, so a failure in one still leaves the others'
# results; the boxes add up to the 480 s total, which also caps every box):
#
#   env      20  nvidia-smi, the versions, `python -m mdgd_kernels.info` before the build
#   build   100  the extension with its CUDA kernels (setup.py build_ext --inplace, all
#                cores), then `info` again; fails unless the cuda backend loads on the GPU
#   tests   110  tests/test_ops_gpu.py (the shared op cases and LARGE_CASES for triton and
#                cuda against the float64 oracle, opcheck of the CUDA kernels),
#                tests/test_triton_gpu.py (opcheck and torch.compile of the Triton ops),
#                tests/test_info.py
#   ops-bf16 55  the op benchmark (benchmarks/bench_ops.py): the 7B-layer and the
#   ops-fp16 55  2,000-small-tensor workloads; pass 1, pass 2 and the whole op in GB/s
#   ops-fp32 55  against the measured device-to-device copy; fused against the per-tensor
#                loop and torch.compile of it
#   step     85  the step benchmark (benchmarks/bench_step.py --llava-7b): LLaVA-1.5-7B
#                widths, 2 decoder layers, bf16; ft, mdgd and gm: step ms, the op's share,
#                peak memory against docs/distributed.md's formula
#
# Files under --out: summary.tsv (part, status, exit code, seconds, box) and summary.txt
# (the same as a table), one <part>.log per part, the build record build.json, and the
# benchmarks' JSON results in results/. The exit code is 0 only if every part passed.
#
# --dry-run runs the same parts on the CPU at tiny sizes (the benchmarks' --quick, no
# torch.compile, the extension built into a temporary folder instead of in place; the GPU
# tests collect and skip; every box three times as long: a CPU compiles and runs slower),
# so that CI keeps this script from rotting. Environment: PYTHON (default python3);
# setup.py finds the CUDA toolkit (CUDA_HOME, else the nvcc on PATH, a wrapper too).
set -uo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }
out="" dry=0 only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --out=*) out="${1#--out=}"; shift ;;
        --dry-run) dry=1; shift ;;
        --part) only="${2:?}"; shift 2 ;;  # internal: run one part (under its time box)
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
[ -n "$out" ] || { echo "gpu_check.sh: --out DIR is required" >&2; usage >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out/results" && out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
total_box=480 scale=1
[ "$dry" = 1 ] && scale=3
total_box=$(( total_box * scale ))
deadline=$(( $(date +%s) + total_box ))
export PYTHONPATH="$root:$root/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cd "$root" || exit 1

if [ "$dry" = 1 ]; then
    device=cpu
    ops_args=(--device cpu --quick --repeats 3 --no-compile)
    step_args=(--device cpu --quick --modes ft,mdgd,gm)
    build_dir=$(mktemp -d)
    trap 'rm -rf "$build_dir"' EXIT
    build_args=(build_ext --build-temp "$build_dir/temp" --build-lib "$build_dir/lib")
    record="$build_dir/lib/mdgd_kernels/_C_build.json"
else
    device=cuda
    ops_args=(--device cuda)
    step_args=(--device cuda --llava-7b --modes ft,mdgd,gm --tag llava7b-2l)
    build_args=(build_ext --inplace)
    record="$root/mdgd_kernels/_C_build.json"
fi

# part NAME BOX FUNCTION [ARG]: run this script's FUNCTION in the time box (cut to what is
# left of the total) in a child process, its output in NAME.log, one line in summary.tsv
part() {
    local name=$1 box=$(( $2 * scale )); shift 2
    local left=$(( deadline - $(date +%s) ))
    [ "$box" -gt "$left" ] && box=$left
    local status rc start=$(date +%s)
    if [ "$box" -le 0 ]; then
        status=no-time rc=-
        echo "no time left for this part" > "$out/$name.log"
    else
        echo "== $name (box ${box} s)"
        timeout --kill-after=10 "$box" bash "$0" --part "$*" --out "$out" $dry_flag \
            > "$out/$name.log" 2>&1
        rc=$?
        case $rc in
            0) status=ok ;;
            124|137) status=timeout ;;
            *) status=failed ;;
        esac
    fi
    local took=$(( $(date +%s) - start ))
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$took" "$box" >> "$out/summary.tsv"
    echo "   $status in ${took} s (exit $rc); last lines of $name.log:"
    tail -n 4 "$out/$name.log" | sed 's/^/   | /'
}

env_part() {
    date -u +"UTC %Y-%m-%dT%H:%M:%SZ"
    echo "dry run: $dry; repo commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null)"
    nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    "$py" - <<'EOF'
import importlib.metadata as md, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "triton", "transformers", "accelerate", "numpy", "pytest", "hypothesis"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
EOF
    command -v nvcc && nvcc --version | tail -n 2
    echo "CUDA_HOME=${CUDA_HOME:-}"
    "$py" -m mdgd_kernels.info
}

build_part() {
    # nvcc compiles each file's architectures in parallel; ninja runs one job per core
    NVCC_APPEND_FLAGS="--threads=0 ${NVCC_APPEND_FLAGS:-}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$py" setup.py "${build_args[@]}" || return
    echo "== build record"
    cat "$record" || return
    cp "$record" "$out/build.json"
    "$py" -c 'import json, sys; r = json.load(open(sys.argv[1])); sys.exit(not r["parts"]["_C"]["built"])' \
        "$record" || { echo "the CPU kernels did not build: see the build log above"; return 1; }
    [ "$dry" = 1 ] && return 0
    echo "== info after the build"
    "$py" -m mdgd_kernels.info
    "$py" - <<'EOF'
import torch
import mdgd_kernels as mk
found = mk.available_backends(torch.device("cuda"))
print("backends on cuda:", found)
assert "cuda" in found, "the CUDA kernels did not load: see the build log above"
EOF
}

tests_part() {
    "$py" -m pytest -q -rfEs -p no:cacheprovider \
        tests/test_ops_gpu.py tests/test_triton_gpu.py tests/test_info.py
}

ops_part() {
    "$py" benchmarks/bench_ops.py --dtype "$1" "${ops_args[@]}" --out "$out/results"
}

step_part() {
    "$py" benchmarks/bench_step.py "${step_args[@]}" --out "$out/results"
}

if [ -n "$only" ]; then
    $only
    exit
fi

dry_flag=""
[ "$dry" = 1 ] && dry_flag=--dry-run
printf 'part\tstatus\texit\tseconds\tbox\n' > "$out/summary.tsv"
echo "gpu_check: device $device, results in $out (total box ${total_box} s)"
part env 20 env_part
part build 100 build_part
part tests 110 tests_part
for dtype in bf16 fp16 fp32; do
    part "ops-$dtype" 55 ops_part "$dtype"
done
part step 85 step_part

column -t -s $'\t' "$out/summary.tsv" > "$out/summary.txt" 2>/dev/null || cp "$out/summary.tsv" "$out/summary.txt"
echo
cat "$out/summary.txt"
failed=$(awk -F'\t' 'NR > 1 && $2 != "ok"' "$out/summary.tsv" | wc -l)
echo "gpu_check: $(( $(wc -l < "$out/summary.tsv") - 1 - failed )) parts ok, $failed not"
[ "$failed" = 0 ]
