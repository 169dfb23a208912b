"""The size options of the small LLaVA that the step and activation benchmarks build.

The model itself is :func:`mdgd.testing.tiny_llava`, shared with the tests and the demo.
"""

from __future__ import annotations

import argparse

# size arguments of mdgd.testing.tiny_llava, with the benchmarks' defaults
SIZE_DEFAULTS = {
    "image_size": 64,
    "patch_size": 8,
    "vision_hidden": 128,
    "vision_layers": 2,
    "text_hidden": 256,
    "text_layers": 4,
    "heads": 4,
    "vocab_size": 1000,
}


def add_size_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One option per size argument (``--image-size``, ...), but those in ``skip``."""
    for name, default in SIZE_DEFAULTS.items():
        if name not in skip:
            parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)


def size_kwargs(args: argparse.Namespace) -> dict[str, int]:
    """The size arguments of ``tiny_llava`` that ``args`` has options for."""
    return {name: getattr(args, name) for name in SIZE_DEFAULTS if hasattr(args, name)}
