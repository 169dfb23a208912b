"""The kernels write pass 1's statistics in the order Python defines (``STAT_NAMES``).

The order is defined once, in ``mdgd_kernels.coeffs``; the C++, CUDA and Triton
kernels spell it out by hand (an FMA per column). These tests read their sources
and fail if any of them computes, or documents, the columns in another order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mdgd_kernels import STAT_NAMES

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ("gt", "ht", "gp", "hp")
_NAME = r"(gt|ht|gp|hp)"
_X, _Y = r"(?P<x>gt|ht|gp|hp)", r"(?P<y>gt|ht|gp|hp)"
# acc[3] = fmaf(gp, gp, acc[3])  /  a[3] = fmadd(gp, gp, a[3])
_FMA = re.compile(rf"(?P<acc>\w+)\[(?P<i>\d)\] = fma\w*\({_X}, {_Y}, (?P=acc)\[(?P=i)\]\)")
# a3 = gp * gp  (Triton's first products)
_TRITON = re.compile(rf"\ba(?P<i>\d) = {_X} \* {_Y}\b")
# comments: "0 gt.gt 1 gt.ht ..." or "stats[s] = (gt.gt, gt.ht, ...)"
_LISTED = re.compile(rf"{_NAME}\.{_NAME}")

KERNELS = {
    "csrc/cpu/segment_gram.cpp": _FMA,
    "csrc/cuda/segment_gram.cu": _FMA,
    "mdgd_kernels/triton/gram.py": _TRITON,
}
COMMENTS = (
    "csrc/mdgd_common.h",
    "csrc/cpu/segment_gram.cpp",
    "csrc/cuda/segment_gram.cu",
    "mdgd_kernels/triton/gram.py",
)


def kernel_order(source: str, pattern: re.Pattern) -> list[str]:
    """The column each index gets, read from the kernel's accumulation lines."""
    columns: dict[int, str] = {}
    for match in pattern.finditer(source):
        columns.setdefault(int(match["i"]), f"{match['x']}.{match['y']}")
    return [columns[i] for i in sorted(columns)]


def listed_orders(source: str) -> list[list[str]]:
    """Every line of the source that lists all ten columns, as the order it lists."""
    orders = []
    for line in source.splitlines():
        names = [f"{x}.{y}" for x, y in _LISTED.findall(line)]
        if len(names) == len(STAT_NAMES):
            orders.append(names)
    return orders


def test_stat_names_are_the_ten_distinct_products():
    pairs = {frozenset(name.split(".")) for name in STAT_NAMES}
    assert len(STAT_NAMES) == len(pairs) == 10
    assert all(set(pair) <= set(VECTORS) for pair in pairs)


@pytest.mark.parametrize("path", sorted(KERNELS), ids=str)
def test_kernel_accumulates_in_python_order(path: str):
    order = kernel_order((ROOT / path).read_text(), KERNELS[path])
    assert order == list(STAT_NAMES), f"{path} accumulates {order}, Python defines {STAT_NAMES}"


@pytest.mark.parametrize("path", COMMENTS, ids=str)
def test_documented_order_is_python_order(path: str):
    orders = listed_orders((ROOT / path).read_text())
    assert orders, f"{path} no longer lists the ten columns; update this test"
    for order in orders:
        assert order == list(STAT_NAMES), f"{path} lists {order}, Python defines {STAT_NAMES}"


def test_parser_sees_a_swapped_column():
    """The check can fail: swap two accumulation lines and the parsed order changes."""
    source = (ROOT / "csrc/cpu/segment_gram.cpp").read_text()
    swapped = source.replace("a[1] = fmadd(gt, ht, a[1])", "a[1] = fmadd(ht, ht, a[1])", 1)
    swapped = swapped.replace("a[2] = fmadd(ht, ht, a[2])", "a[2] = fmadd(gt, ht, a[2])", 1)
    assert swapped != source
    assert kernel_order(swapped, _FMA) != list(STAT_NAMES)


def test_every_source_that_spells_the_order_is_checked():
    """A new C++/CUDA/Triton file that accumulates or lists the columns joins the tables above."""
    sources = [*ROOT.glob("csrc/**/*.[ch]*"), *ROOT.glob("mdgd_kernels/triton/*.py")]
    assert len(sources) >= 10
    for path in sources:
        rel, text = path.relative_to(ROOT).as_posix(), path.read_text()
        if _FMA.search(text) or _TRITON.search(text):
            assert rel in KERNELS, f"{rel} accumulates statistics: add it to KERNELS"
        if listed_orders(text):
            assert rel in COMMENTS, f"{rel} lists the statistics: add it to COMMENTS"
