"""The repository's setup.py as a module, for the tests that check its parts.

setup.py calls ``setup()`` only when run as ``__main__``, so importing it here only
defines its functions and constants (``find_cuda_toolkit``, ``GENCODE``, ...).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SETUP_PY = Path(__file__).resolve().parents[2] / "setup.py"


def _load():
    spec = importlib.util.spec_from_file_location("mdgd_setup", SETUP_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


setup_py = sys.modules.get("mdgd_setup") or _load()
