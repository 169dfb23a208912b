"""What the driver knows about Hugging Face MLLM families, and how two models' configs compare.

* :func:`check_same_config`: theta and phi must be one architecture with one
  configuration (a ``ref_model`` with another ``vision_feature_layer`` or
  ``rope_theta`` has the same shapes but computes another function); only keys
  that do not change what an eval-mode forward computes may differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

TRAINING_ONLY_KEYS = frozenset(
    {
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_commit_hash",
        "_name_or_path",
        "architectures",
        "attn_implementation",
        "bos_token_id",
        "dtype",
        "eos_token_id",
        "gradient_checkpointing",
        "id2label",
        "initializer_factor",
        "initializer_range",
        "label2id",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    }
)
"""Config keys that may differ between theta and phi: run-time switches (cache,
outputs, attention kernel, dtype), initialisation and bookkeeping. Any key
containing ``dropout`` is training-only too (phi runs in eval mode)."""


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _training_only(key: str) -> bool:
    return key in TRAINING_ONLY_KEYS or "dropout" in key


def _flat(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if _training_only(k):
            continue
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def check_same_config(model: nn.Module, ref_model: nn.Module) -> None:
    """ValueError naming the first config key (dotted, e.g. ``text_config.rope_parameters.
    rope_theta``) on which the two models differ, training-only keys aside."""
    cfg, ref_cfg = getattr(model, "config", None), getattr(ref_model, "config", None)
    if cfg is None or ref_cfg is None or not hasattr(cfg, "to_dict"):
        return
    mine, theirs = dict(_flat(cfg.to_dict())), dict(_flat(ref_cfg.to_dict()))
    for key in list(mine) + [k for k in theirs if k not in mine]:
        a, b = mine.get(key, _ABSENT), theirs.get(key, _ABSENT)
        if a != b:
            raise ValueError(
                f"ref_model's config differs from model's at {key!r}: {b!r} in ref_model, "
                f"{a!r} in model. "
                "MDGD compares theta with the pre-trained model it started from: build "
                "ref_model from the same config (only training-only keys such as dropout, "
                "use_cache or dtype may differ)"
            )
