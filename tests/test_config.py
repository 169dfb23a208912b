"""MDGDConfig validation, mark_trainable and llava_trainable_patterns."""

from __future__ import annotations

import pytest
import torch
from llava_tiny import (
    one_thread,  # noqa: F401  (fixture)
    tiny_llava,
    tiny_llava_config,
)

import mdgd_kernels
from mdgd import MDGDConfig, llava_trainable_patterns, mark_trainable

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_are_the_fixed_interface():
    cfg = MDGDConfig()
    assert (cfg.mode, cfg.align, cfg.alpha, cfg.alpha_by) == ("mdgd", True, 0.1, "elements")
    assert (cfg.visual_weight, cfg.granularity, cfg.nonfinite) == (1.0, "tensor", "raise")
    assert cfg.trainable is None and cfg.backend is None
    assert MDGDConfig(granularity="block:64").block_size == 64
    assert MDGDConfig(trainable=["a", "b"]).to_dict()["trainable"] == ["a", "b"]


def test_op_kwargs_carry_the_direction_settings_to_the_op():
    cfg = MDGDConfig(mode="gm", alpha=0.3, align=False, alpha_by="segments", eps=1e-4)
    kw = cfg.op_kwargs()
    assert kw == {"mode": "gm", "alpha": 0.3, "align": False, "alpha_by": "segments", "eps": 1e-4}
    sizes = [7, 3, 11, 5]
    gen = torch.Generator().manual_seed(3)
    bufs = [torch.randn(sum(sizes), generator=gen) for _ in range(4)]
    got = mdgd_kernels.mdgd_direction_(*[b.clone() for b in bufs], sizes, **kw)
    want = mdgd_kernels.mdgd_direction_(
        *[b.clone() for b in bufs],
        sizes,
        mode="gm",
        alpha=0.3,
        align=False,
        alpha_by="segments",
        eps=1e-4,
    )
    assert torch.equal(got.mask, want.mask) and torch.equal(got.cos, want.cos)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "pcgrad"}, "mode"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha_by": "params"}, "alpha_by"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"visual_weight": -1.0}, "visual_weight"),
        ({"granularity": "block:0"}, "granularity"),
        ({"granularity": "block:x"}, "granularity"),
        ({"granularity": "layer"}, "granularity"),
        ({"trainable": "layers"}, "list"),
        ({"trainable": ["("]}, "regex"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MDGDConfig(**kwargs)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(text_layers=4)


def test_llava_patterns_select_last_layers_and_projector(model):
    pats = llava_trainable_patterns(model, num_layers=2)
    chosen = [n for n, _ in mark_trainable(model, pats)]
    assert chosen and all(
        n.startswith(
            (
                "model.language_model.layers.2.",
                "model.language_model.layers.3.",
                "model.multi_modal_projector.",
            )
        )
        for n in chosen
    )
    assert any(n.startswith("model.multi_modal_projector.") for n in chosen)
    assert any(n.startswith("model.language_model.layers.2.") for n in chosen)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert (
        "lm_head.weight" in frozen and "model.language_model.layers.1.mlp.up_proj.weight" in frozen
    )
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(chosen)
    # the config gives the same patterns as the model
    assert llava_trainable_patterns(model.config, num_layers=2) == pats


def test_llava_patterns_options_and_errors(model):
    no_proj = llava_trainable_patterns(model, num_layers=1, projector=False)
    names = [n for n, _ in mark_trainable(model, no_proj)]
    assert all(n.startswith("model.language_model.layers.3.") for n in names)
    only_proj = llava_trainable_patterns(tiny_llava_config(text_layers=4), 0)
    assert only_proj == [r"^model\.multi_modal_projector(\.|$)"]
    with pytest.raises(ValueError, match="num_layers"):
        llava_trainable_patterns(model, num_layers=5)
    with pytest.raises(ValueError, match="select nothing"):
        llava_trainable_patterns(model, num_layers=0, projector=False)
    with pytest.raises(ValueError, match="cannot tell the language-model layers of Linear"):
        llava_trainable_patterns(torch.nn.Linear(2, 2), num_layers=1)


def test_mark_trainable_raises_when_nothing_matches(model):
    with pytest.raises(ValueError, match="no parameter of LlavaForConditionalGeneration matches"):
        mark_trainable(model, [r"^nothing\."])
