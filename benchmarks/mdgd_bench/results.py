"""Where the benchmarks' JSON results go, and how they are named.

One scheme for every benchmark: ``<benchmark>-<device>-<dtype>[-<tags>]-<UTC start>.json``,
for example ``ops-cpu-bf16-20261125T114158Z.json`` or
``step-cuda-fp32-quick-20261126T010203Z.json`` (tags: ``quick`` for ``--quick`` runs,
then the ``--tag`` given). The directory never depends on the working directory:

* ``--out DIR`` when given;
* else, run from a checkout, the checkout's ``benchmarks/results/``;
* else (the benchmarks of an installed wheel) ``$XDG_DATA_HOME/mdgd/bench-results/``,
  by default ``~/.local/share/mdgd/bench-results/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the scripts sit beside this package in a checkout; the wheel ships the package alone
CHECKOUT_RESULTS = HERE.parent / "results" if (HERE.parent / "bench_ops.py").is_file() else None
TAG = re.compile(r"[A-Za-z0-9._]+(-[A-Za-z0-9._]+)*")


def default_dir() -> Path:
    """The results directory when ``--out`` is not given (see the module docstring)."""
    if CHECKOUT_RESULTS is not None:
        return CHECKOUT_RESULTS
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "mdgd" / "bench-results"


def result_name(
    benchmark: str, device: str, dtype: str, started: _dt.datetime, tags: list[str]
) -> str:
    for tag in tags:
        if not TAG.fullmatch(tag):
            raise ValueError(
                f"tag {tag!r} would break the result file name: use letters, digits, '.', "
                "'_' and single '-' only"
            )
    stamp = started.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    device_type = device.split(":")[0]
    return "-".join([benchmark, device_type, dtype, *tags, stamp]) + ".json"


def save(
    record: dict,
    args: argparse.Namespace,
    *,
    benchmark: str,
    device: str,
    dtype: str,
    started: _dt.datetime,
) -> Path:
    """Write ``record`` under ``args.out`` (or :func:`default_dir`), named by the scheme with
    the tags of ``args.quick`` and ``args.tag``; never overwrite an earlier result."""
    tags = (["quick"] if args.quick else []) + ([args.tag] if args.tag else [])
    directory = Path(args.out) if args.out else default_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / result_name(benchmark, device, dtype, started, tags)
    with path.open("x") as f:  # FileExistsError rather than losing an earlier result
        json.dump(record, f, indent=2)
    print(f"saved {path}")
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out`` and ``--tag``, the same for every benchmark."""
    where = "the checkout's benchmarks/results, or ~/.local/share/mdgd/bench-results"
    parser.add_argument(
        "--out",
        default=None,
        help=f"directory for the JSON result (default: {where} when mdgd is installed "
        "from a wheel); the file is named <benchmark>-<device>-<dtype>[-<tags>]-<UTC time>.json",
    )
    parser.add_argument(
        "--tag", default=None, help="a label added to the result's file name, e.g. dist-22M"
    )
