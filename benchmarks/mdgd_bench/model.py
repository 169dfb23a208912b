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
    "max_position_embeddings": 128,
    # None: twice the hidden size / the text model's heads (tiny_llava_config's defaults)
    "vision_intermediate": None,
    "text_intermediate": None,
    "vision_heads": None,
}

# LLaVA-1.5-7B's widths (CLIP ViT-L/14 at 336 px, Vicuna-7B) with as many decoder
# layers as the caller asks: the step benchmark's --llava-7b
LLAVA_7B = {
    "image_size": 336,
    "patch_size": 14,
    "vision_hidden": 1024,
    "vision_intermediate": 4096,
    "vision_layers": 24,
    "vision_heads": 16,
    "text_hidden": 4096,
    "text_intermediate": 11008,
    "heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
}


def add_size_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One option per size argument (``--image-size``, ...), but those in ``skip``."""
    for name, default in SIZE_DEFAULTS.items():
        if name not in skip:
            parser.add_argument("--" + name.replace("_", "-"), type=int, default=default)


def size_kwargs(args: argparse.Namespace) -> dict[str, int | None]:
    """The size arguments of ``tiny_llava`` that ``args`` has options for."""
    return {name: getattr(args, name) for name in SIZE_DEFAULTS if hasattr(args, name)}
