"""The ``TRITON_INTERPRET=1`` worker that runs the interpreter cases, and its RPC.

Not a test file. ``triton.jit`` picks "interpreted or compiled" when a kernel is
decorated, from ``TRITON_INTERPRET``, so the interpreter cases cannot share the
test process with the AOT tests (nor should the variable leak into other test
files). They run in one worker subprocess, started with ``TRITON_INTERPRET=1`` by
running this file as a script (``--serve``): each parametrised test sends it a
function by its ``module.name`` (the shared cases of ``op_cases.py``, the Triton-only
ones of ``triton_cases.py``) and re-raises its failure, so every case is still
reported on its own.

    worker = Worker()
    worker.run("triton_cases.case_gram_config", dtype="bf16", ...)  # fails the test on error
    worker.close()
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import select
import struct
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent  # tests/helpers
TESTS = HERE.parent  # conftest.py: the shared input builders
REPO = TESTS.parent


class Worker:
    """One ``TRITON_INTERPRET=1`` subprocess running test-helper functions on request."""

    TIMEOUT_S = 300

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), str(TESTS), str(HERE), env.get("PYTHONPATH", "")) if p
        )
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=str(REPO),
        )

    def run(self, name: str, **kwargs) -> None:
        """Call ``name`` (``module.function`` of tests/helpers) with ``kwargs`` in the worker."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        _send(self.proc.stdin, (name, kwargs))
        ready, _, _ = select.select([self.proc.stdout], [], [], self.TIMEOUT_S)
        if not ready:
            self.close()
            pytest.fail(f"interpreter case {name} timed out after {self.TIMEOUT_S}s", pytrace=False)
        try:
            ok, text = _recv(self.proc.stdout)
        except EOFError:
            self.close()
            pytest.fail(f"the interpreter worker died running {name}", pytrace=False)
        if text:
            print(text, end="")
        if not ok:
            pytest.fail(f"interpreter case {name}({kwargs}) failed:\n{text}", pytrace=False)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _recv(stream):
    head = stream.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(stream.read(n))


def _serve() -> None:
    """Worker loop: requests on stdin, replies on the original stdout; prints go to stderr."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    requests = sys.stdin.buffer
    while True:
        try:
            name, kwargs = _recv(requests)
        except EOFError:
            return
        buf = io.StringIO()
        try:
            module, func = name.rsplit(".", 1)
            with contextlib.redirect_stdout(buf):
                getattr(importlib.import_module(module), func)(**kwargs)
            _send(replies, (True, buf.getvalue()))
        except BaseException:  # report everything, including pytest.fail/skip exceptions
            _send(replies, (False, buf.getvalue() + traceback.format_exc()))


if __name__ == "__main__" and "--serve" in sys.argv:
    _serve()
