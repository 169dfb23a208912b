"""The step benchmark, the same as ``mdgd bench step``: its code is :mod:`mdgd_bench.step`.

python benchmarks/bench_step.py --quick
"""

from mdgd_bench.step import main

if __name__ == "__main__":
    main()
