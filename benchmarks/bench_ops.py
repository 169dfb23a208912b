"""Benchmark the fused MDGD ops; see :mod:`mdgd.bench` (same as ``mdgd bench``)."""

import sys

from mdgd.bench import main

if __name__ == "__main__":
    main(sys.argv[1:])
