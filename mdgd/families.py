"""What the driver knows about Hugging Face MLLM families, and how two models' configs compare.

* :data:`FAMILY_MODULES`: per ``model_type`` (transformers 5 names of the
  ``...ForConditionalGeneration`` classes), the language model's decoder layers
  and the modules that bridge vision and language (the projector; LLaVA-NeXT's
  ``image_newline`` is trained with it). :func:`trainable_modules` finds them in
  a model, by these names or, for a family not in the table, by the suffixes
  every family uses, and otherwise raises listing the candidates it found.
* :func:`check_same_config`: theta and phi must be one architecture with one
  configuration (a ``ref_model`` with another ``vision_feature_layer`` or
  ``rope_theta`` has the same shapes but computes another function); only keys
  that do not change what an eval-mode forward computes may differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from torch import nn

_LLAVA = ("model.language_model.layers", ("model.multi_modal_projector",))
_NEXT = ("model.language_model.layers", ("model.multi_modal_projector", "model.image_newline"))
_QWEN = ("model.language_model.layers", ("model.visual.merger",))
_IDEFICS = ("model.text_model.layers", ("model.connector",))
FAMILY_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llava": _LLAVA,
    "llava_next": _NEXT,
    "llava_onevision": _NEXT,
    "vipllava": _LLAVA,
    "aya_vision": _LLAVA,
    "mistral3": _LLAVA,
    "internvl": _LLAVA,
    "paligemma": _LLAVA,
    "gemma3": _LLAVA,
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": (
        "model.language_model.layers",
        ("model.visual.merger", "model.visual.deepstack_merger_list"),
    ),
    "idefics2": _IDEFICS,
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
}
"""``model_type`` -> (decoder layers, projector modules or parameters)."""

LAYER_SUFFIXES = ("language_model.layers", "text_model.layers", "language_model.model.layers")
PROJECTOR_SUFFIXES = ("multi_modal_projector", "visual.merger", "connector", "mm_projector")
PROJECTOR_EXTRAS = ("image_newline", "visual.deepstack_merger_list")
_HINTS = ("proj", "connector", "merger", "adapter", "aligner", "resampler", "newline")


class TrainableModules(NamedTuple):
    layers: str  # the decoder layers' ModuleList
    num_layers: int
    projector: tuple[str, ...]  # modules or parameters; empty when none was found


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


def _named(model: nn.Module) -> dict[str, Any]:
    return {**dict(model.named_modules()), **dict(model.named_parameters())}


def _find(named: dict[str, Any], suffix: str, kind: type | None = None) -> str | None:
    hits = [
        n
        for n, m in named.items()
        if (n == suffix or n.endswith("." + suffix)) and (kind is None or isinstance(m, kind))
    ]
    return min(hits, key=len) if hits else None


def trainable_modules(model: nn.Module) -> TrainableModules:
    """The decoder layers and the projector of ``model`` (see :data:`FAMILY_MODULES`)."""
    named = _named(model)
    family = getattr(getattr(model, "config", None), "model_type", None)
    known = FAMILY_MODULES.get(family)
    if known is not None and isinstance(named.get(known[0]), nn.ModuleList):
        layers, projector = known[0], tuple(n for n in known[1] if n in named)
    else:  # another family, or a base model without the "model." prefix: by suffix
        layers = next((h for s in LAYER_SUFFIXES if (h := _find(named, s, nn.ModuleList))), None)
        if layers is None:
            raise ValueError(_not_found(model, named))
        main = next((h for s in PROJECTOR_SUFFIXES if (h := _find(named, s))), None)
        extras = [h for s in PROJECTOR_EXTRAS if (h := _find(named, s))]
        projector = tuple([main] + extras) if main is not None else ()
    return TrainableModules(layers, len(named[layers]), projector)


def _not_found(model: nn.Module, named: dict[str, Any]) -> str:
    lists = [f"{n} ({len(m)})" for n, m in named.items() if isinstance(m, nn.ModuleList)]
    bridges = [
        n
        for n, m in named.items()
        if isinstance(m, nn.Module) and n.count(".") <= 2 and any(h in n for h in _HINTS)
    ]
    return (
        f"cannot tell the language-model layers of {type(model).__name__} "
        f"(model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r}; known: "
        f"{', '.join(sorted(FAMILY_MODULES))}). Its ModuleLists: {', '.join(lists) or 'none'}; "
        f"modules that look like a projector: {', '.join(bridges) or 'none'}. Write the "
        r"trainable patterns by hand, e.g. [r'^<layers>\.(10|11)\.', r'^<projector>\.']"
    )


def config_modules(config: Any) -> TrainableModules:
    """:class:`TrainableModules` from a config: the ``FAMILY_MODULES`` names of its
    ``model_type`` (no model to check them against) and its number of text layers."""
    family = getattr(config, "model_type", None)
    text = getattr(config, "text_config", config)
    total = getattr(text, "num_hidden_layers", None)
    if total is None or family not in FAMILY_MODULES:
        raise ValueError(
            f"cannot tell the trainable modules of a {type(config).__name__} (model_type "
            f"{family!r}; known: {', '.join(sorted(FAMILY_MODULES))}): pass the model instead"
        )
    layers, projector = FAMILY_MODULES[family]
    return TrainableModules(layers, total, projector)
