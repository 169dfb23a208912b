"""Smoke test of an *installed* mdgd, run by CI's sdist step and tests/test_packaging.py.

    python tests/helpers/install_smoke.py --backend cpu    # the C++ extension must have loaded
    python tests/helpers/install_smoke.py --backend torch  # the install fell back, and said so once

Run it by path from outside the checkout (a script's own folder, not the current
one, heads ``sys.path``), so that it imports the installed package. It imports
``mdgd_kernels``, checks which backend ``backend=None`` picks and that the
fallback warning comes exactly once when it is ``torch``, runs
``mdgd_direction_`` twice on fresh random buffers against the float64 oracle,
and prints the ``mdgd_kernels.info`` report. Then it checks that ``mdgd bench``
finds the benchmarks' code the wheel installs (``mdgd_bench``) and that their
results would go to the user's data directory, not into site-packages.
"""

from __future__ import annotations

import argparse
import sysconfig
import warnings
from pathlib import Path

import torch

SIZES = [70_000, 1, 513]  # a multi-chunk segment, a single element, an odd tail


def _check_op(mk, reference_direction) -> None:
    for _ in range(2):
        bufs = [torch.randn(sum(SIZES)) for _ in range(4)]
        out = [b.clone() for b in bufs]
        mk.mdgd_direction_(*out, SIZES)
        ref = reference_direction(*bufs, SIZES)
        torch.testing.assert_close(out[0].double(), ref.direction, rtol=1e-4, atol=1e-4)


def _check_benchmarks(site: Path) -> str:
    from mdgd.cli import benchmark_module

    for name in ("ops", "step"):
        where = Path(benchmark_module(name).__file__).resolve()
        assert site in where.parents, f"mdgd bench imports {where}, not the install under {site}"
    results = benchmark_module("results").default_dir()
    assert site not in results.parents, f"results would go into the install: {results}"
    return f"mdgd bench: the benchmarks under {site}, results to {results}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", choices=("cpu", "torch"), required=True, help="what backend=None must pick"
    )
    expect = parser.parse_args().backend
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import mdgd_kernels as mk
        from mdgd_kernels.reference import reference_direction

        site = Path(sysconfig.get_paths()["purelib"]).resolve()
        where = Path(mk.__file__).resolve()
        assert site in where.parents, f"imported {where}, not the install under {site}"
        picked = mk.resolve_backend(None, torch.device("cpu"))
        assert picked == expect, f"backend=None picks {picked!r}, expected {expect!r}"
        _check_op(mk, reference_direction)
    fallback = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(fallback) == (expect == "torch"), f"fallback warnings: {fallback}"
    from mdgd_kernels.info import report

    benchmarks = _check_benchmarks(site)
    print(*fallback, report(), benchmarks, f"smoke test passed on backend {picked!r}", sep="\n")


if __name__ == "__main__":
    main()
