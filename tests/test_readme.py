"""The README's quick start runs as written and prints what it claims."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start: the ops") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```", start)]


def test_quick_start_keeps_alpha_of_the_elements_on_fresh_buffers():
    code = quick_start()
    assert code.count("gradients()") >= 3, "each op call gets fresh gradients"
    out = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), scope)
    printed = re.search(r"kept (\d+) of (\d+) blocks, ([\d.]+)% of the elements", out.getvalue())
    assert printed, out.getvalue()
    kept, blocks, percent = int(printed[1]), int(printed[2]), float(printed[3])
    assert blocks == scope["n"] // 4096
    assert 10.0 <= percent <= 10.0 + 100 * 4096 / scope["n"] + 0.05
    assert kept == int(scope["res"].mask.sum())
    assert 0.1 * blocks <= kept <= 0.1 * blocks + 1
