"""The op benchmark, the same as ``mdgd bench``: its code is :mod:`mdgd_bench.ops`.

python benchmarks/bench_ops.py --quick
"""

from mdgd_bench.ops import main

if __name__ == "__main__":
    main()
