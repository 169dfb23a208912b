"""``python -m mdgd_kernels.info`` (or ``mdgd info``): what a bug report needs.

Prints the package version; the torch, CUDA and Triton versions; whether the
compiled kernels loaded, part by part (the CPU kernels of ``mdgd_kernels._C``, the
CUDA kernels of ``mdgd_kernels._C_cuda``), and why not; the torch they were built
against, the CUDA toolkit and the CUDA architectures (read from the nvcc command
line the build record holds); the backends available per device and the one
``backend=None`` picks; and the thread counts.
Paste the whole output into the issue.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import torch

import mdgd_kernels as mk
from mdgd_kernels import _ext, backends


def _source_version() -> str:
    """The version of a source tree run without installing it (on PYTHONPATH)."""
    from mdgd import __version__

    return f"{__version__} (not installed: a source tree)"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda() -> str:
    if torch.version.cuda is None:
        return "none (a CPU build of torch)"
    if not torch.cuda.is_available():
        return f"{torch.version.cuda} (torch's build); no GPU visible"
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{torch.version.cuda} (torch's build); {len(gpus)} GPU(s): {', '.join(gpus)}"


def _triton() -> str:
    version = _version("triton")
    if version is None:
        return "not installed"
    mod = backends.triton_module()
    return version + ("" if mod.available else f" (the triton backend is unusable: {mod.error})")


_NVCC_TARGET_OPTIONS = {
    "-gencode": "gencode",
    "--generate-code": "gencode",
    "-arch": "arch",
    "--gpu-architecture": "arch",
    "-code": "code",
    "--gpu-code": "code",
}


def cuda_archs(command: str | Sequence[str]) -> list[str]:
    """The GPU code an nvcc command line compiles for, in its order: ``sm_XY`` for
    machine code (SASS), ``compute_XY`` for PTX, or ``native``/``all``/``all-major``.

    Reads ``-gencode``/``--generate-code`` (``=`` or a space, ``code=`` one target or a
    list) and ``-arch``/``--gpu-architecture`` with ``-code``/``--gpu-code``, where,
    as nvcc's help says, ``-arch=sm_XY`` alone means ``code=sm_XY,compute_XY``.
    """
    args = shlex.split(command) if isinstance(command, str) else list(command)
    found: dict[str, list[str]] = {"gencode": [], "arch": [], "code": []}
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        kind = _NVCC_TARGET_OPTIONS.get(name)
        if kind is not None:
            if not eq and i + 1 < len(args):  # "-gencode arch=...", "-arch sm_90"
                i += 1
                value = args[i]
            found[kind].append(value)
        i += 1
    codes = []
    for value in found["gencode"]:
        target = re.search(r"(?:^|,)code=(.+)$", value)
        if target:
            codes += target.group(1).strip("[]\"'").split(",")
    for value in found["code"]:
        codes += value.strip("[]\"'").split(",")
    if not found["code"]:
        for arch in found["arch"]:
            # the shorthand: a real architecture alone adds its virtual one as PTX
            real = arch.startswith("sm_")
            codes += [arch, "compute_" + arch.removeprefix("sm_")] if real else [arch]
    return list(dict.fromkeys(c.strip() for c in codes if c.strip()))


def _part(module, error: BaseException | None) -> str:
    if module is not None:
        return f"loaded ({module.__file__})"
    return f"not loaded: {type(error).__name__}: {error}"


def _cuda_build(record: dict | None) -> tuple[str, str]:
    """The rows on the CUDA part's build: its toolkit, its architectures."""
    if record is None:
        unknown = "unknown (no build record: built by an older setup.py, or never built)"
        return unknown, unknown
    part = record.get("parts", {}).get(_ext.CUDA_PART, {})
    toolkit = (
        f"{part['toolkit']} (found by {part.get('toolkit_found_by')})"
        if part.get("toolkit")
        else "none used"
    )
    command = part.get("nvcc_command")
    if not command:
        if part.get("built"):
            return toolkit, "unknown (no nvcc command line in the build record)"
        return toolkit, "none (no CUDA build)"
    archs = " ".join(cuda_archs(command)) or "nvcc's default"
    return toolkit, archs if part.get("built") else f"none (the build for {archs} failed)"


def _extension() -> dict[str, str]:
    record = _ext.build
    toolkit, archs = _cuda_build(record)
    return {
        "CPU kernels": _part(_ext._C, _ext.error),
        "CUDA kernels": _part(_ext._C_cuda, _ext.cuda_error),
        "built against torch": record["torch"] if record else "unknown (no build record)",
        "CUDA toolkit": toolkit,
        "CUDA architectures": archs,
    }


def _backends(device: str) -> str:
    names = mk.available_backends(device)
    picked = mk.resolve_backend(None, torch.device(device))
    return f"{', '.join(names)}; backend=None picks {picked!r}"


def collect() -> dict[str, str]:
    """Every field of the report, by label, in print order."""
    package = Path(mk.__file__).resolve().parent.parent
    return {
        "mdgd": f"{_version('mdgd') or _source_version()} (imported from {package})",
        "python": f"{platform.python_version()} ({platform.platform()})",
        "torch": str(torch.__version__),
        "CUDA": _cuda(),
        "Triton": _triton(),
        # the training stack, from the installed metadata (nothing is imported)
        "transformers, accelerate, deepspeed": ", ".join(
            _version(d) or "not installed" for d in ("transformers", "accelerate", "deepspeed")
        ),
        **_extension(),
        "backends on cpu": _backends("cpu"),
        "backends on cuda": _backends("cuda") if torch.cuda.is_available() else "no GPU visible",
        "MDGD_BACKEND": os.environ.get("MDGD_BACKEND") or "unset",
        "threads": (
            f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"
        ),
    }


def report() -> str:
    """The report as printed: one ``label: value`` line per field."""
    fields = collect()
    width = max(map(len, fields))
    return "\n".join(f"{label + ':':<{width + 1}} {value}" for label, value in fields.items())


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m mdgd_kernels.info",
        description="Print the versions, the compiled kernels' state and the backends of "
        "this installation of mdgd: paste it into bug reports.",
    ).parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
