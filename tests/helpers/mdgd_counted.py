"""``python -m mdgd`` with the forgetting monitor's measurements counted, per rank.

    MDGD_COUNTS=DIR python -m mdgd_counted train ...   (tests/helpers on PYTHONPATH)

The same command line as ``python -m mdgd``; it wraps :func:`mdgd.monitor.visual_erank`
and :func:`mdgd.monitor.exact_match` (the monitor looks both up when it calls them)
with counters and writes ``DIR/rank-<RANK>.json`` (``{"visual_erank": n,
"exact_match": n}``) when the process exits, also through ``mdgd train``'s exit
path under torchrun, which runs the exit handlers and then ``os._exit``.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys

import mdgd.monitor as monitor
from mdgd.cli import main

COUNTED = ("visual_erank", "exact_match")
calls = dict.fromkeys(COUNTED, 0)


def counted(name: str):
    fn = getattr(monitor, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def write_counts() -> None:
    path = os.path.join(os.environ["MDGD_COUNTS"], f"rank-{os.environ.get('RANK', '0')}.json")
    with open(path, "w") as f:
        json.dump(calls, f)


if __name__ == "__main__":
    for name in COUNTED:
        setattr(monitor, name, counted(name))
    atexit.register(write_counts)
    sys.exit(main())
