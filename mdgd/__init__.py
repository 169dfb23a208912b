"""mdgd: Modality-Decoupled Gradient Descent for multimodal LLM instruction tuning.

    from mdgd import MDGDConfig, MDGDEngine, llava_trainable_patterns

    cfg = MDGDConfig(mode="mdgd", trainable=llava_trainable_patterns(model, num_layers=6))
    engine = MDGDEngine(model, ref_model, optimizer, cfg)
    figures = engine.step(batch)

The HF Trainer lives in :mod:`mdgd.integrations.hf` (imported on demand, so that
``import mdgd`` imports neither transformers nor triton and never touches CUDA).
"""

from __future__ import annotations

from .config import MDGDConfig, llava_trainable_patterns, mark_trainable
from .distributed import deepspeed_models, shard_models
from .engine import FIGURES, MDGDEngine
from .recompute import recompute_layers
from .reference import reference_model
from .visual import ImageTokenHidden

__version__ = "0.1.0"

__all__ = [
    "FIGURES",
    "ImageTokenHidden",
    "MDGDConfig",
    "MDGDEngine",
    "deepspeed_models",
    "llava_trainable_patterns",
    "mark_trainable",
    "recompute_layers",
    "reference_model",
    "shard_models",
]
