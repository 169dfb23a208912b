"""mdgd: Modality-Decoupled Gradient Descent for multimodal LLM instruction tuning."""

from __future__ import annotations

__version__ = "0.1.0"
