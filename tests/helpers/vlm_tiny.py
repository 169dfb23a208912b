"""Tiny models of the MLLM families ``llava_trainable_patterns`` knows, and their batches.

Every model is built from a config (random weights, no download), small enough
that two MDGD steps take well under a second; every batch holds the image tokens
the model expects (counted with the model where the count depends on it) plus
the extra inputs a family needs (``image_sizes``, ``image_grid_thw``,
``mm_token_type_ids``, ``token_type_ids``).

    model = build("qwen2_vl", seed=0)
    batch = image_batch(model, seed=1)
"""

from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 5
VOCAB = 96
TEXT_LEN = 6


# the smallest sizes every family accepts: hidden 32, 2 heads, 16x16 images
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
VIT = dict(
    image_size=16,
    patch_size=8,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
)
QWEN_VIT = dict(
    depth=1,
    embed_dim=32,
    hidden_size=32,
    num_heads=2,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    in_channels=3,
)


def _text(**kw) -> dict:
    return {**TEXT, **kw}


def _clip(**kw) -> dict:
    return {**VIT, "model_type": "clip_vision_model", "projection_dim": 32, **kw}


def _siglip(**kw) -> dict:
    return {**VIT, "model_type": "siglip_vision_model", **kw}


def _qwen_vision(**kw) -> dict:
    return {**QWEN_VIT, **kw}


def _qwen_ids() -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=6,
        vision_start_token_id=7,
        vision_end_token_id=8,
    )


def _config(family: str):
    import transformers as T

    llava_like = dict(
        vision_config=_clip(),
        text_config=_text(model_type="llama"),
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
    )
    if family == "llava":
        return T.LlavaConfig(**llava_like, vision_feature_select_strategy="default")
    if family == "llava_next":
        return T.LlavaNextConfig(**llava_like, image_grid_pinpoints=[[16, 16], [16, 32]])
    if family == "llava_onevision":
        return T.LlavaOnevisionConfig(
            **{**llava_like, "vision_config": _siglip()}, image_grid_pinpoints=[[16, 16], [16, 32]]
        )
    if family == "vipllava":
        return T.VipLlavaConfig(
            vision_config=_clip(num_hidden_layers=2),
            text_config=_text(model_type="llama"),
            image_token_index=IMAGE_TOKEN_ID,
            vision_feature_layers=[-2, -1],
        )
    if family == "qwen2_vl":
        text = _text(
            model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}
        )
        return T.Qwen2VLConfig(text_config=text, vision_config=_qwen_vision(), **_qwen_ids())
    if family == "qwen2_5_vl":
        text = _text(
            model_type="qwen2_5_vl_text", rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}
        )
        vision = _qwen_vision(
            out_hidden_size=32, intermediate_size=64, fullatt_block_indexes=[0], window_size=16
        )
        return T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_qwen_ids())
    if family in ("idefics3", "smolvlm"):
        cls = T.Idefics3Config if family == "idefics3" else T.SmolVLMConfig
        return cls(
            text_config=_text(model_type="llama"),
            vision_config={**VIT, "patch_size": 4},
            image_token_id=IMAGE_TOKEN_ID,
            scale_factor=2,
        )
    if family == "paligemma":
        return T.PaliGemmaConfig(
            vision_config=_siglip(),
            text_config=_text(model_type="gemma"),
            image_token_index=IMAGE_TOKEN_ID,
            projection_dim=32,
        )
    if family == "gemma3":
        return T.Gemma3Config(
            vision_config=_siglip(),
            text_config=_text(model_type="gemma3_text", sliding_window=64),
            mm_tokens_per_image=4,
            image_token_index=IMAGE_TOKEN_ID,
            boi_token_index=7,
            eoi_token_index=8,
        )
    if family == "qwen3_vl":
        text = _text(
            model_type="qwen3_vl_text",
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]},
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=32,
            deepstack_visual_indexes=[0],
            num_position_embeddings=16,
        )
        return T.Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_ids())
    if family == "aya_vision":
        return T.AyaVisionConfig(
            vision_config=_siglip(),
            text_config=_text(model_type="cohere2"),
            image_token_index=IMAGE_TOKEN_ID,
            downsample_factor=2,
        )
    if family == "internvl":
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=[16, 16],
            patch_size=[8, 8],
        )
        return T.InternVLConfig(
            vision_config=vision,
            text_config=_text(model_type="qwen2"),
            image_token_id=IMAGE_TOKEN_ID,
        )
    if family == "idefics2":
        perceiver = dict(
            hidden_size=32,
            resampler_n_latents=4,
            resampler_depth=1,
            resampler_n_heads=2,
            resampler_head_dim=16,
            num_key_value_heads=2,
        )
        return T.Idefics2Config(
            text_config=_text(model_type="mistral"),
            vision_config={**VIT, "patch_size": 4},
            perceiver_config=perceiver,
            image_token_id=IMAGE_TOKEN_ID,
        )
    if family == "mistral3":
        vision = {**VIT, "model_type": "pixtral", "patch_size": 4, "head_dim": 16}
        return T.Mistral3Config(
            vision_config=vision,
            text_config=_text(model_type="mistral"),
            image_token_index=IMAGE_TOKEN_ID,
            spatial_merge_size=2,
        )
    raise ValueError(family)


FAMILIES = (
    "llava",
    "llava_next",
    "llava_onevision",
    "vipllava",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
    "paligemma",
    "gemma3",
    "qwen3_vl",
    "aya_vision",
    "internvl",
    "idefics2",
    "mistral3",
)


def build(family: str, seed: int = 0):
    """A random tiny ``...ForConditionalGeneration`` of ``family`` (deterministic in ``seed``)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(_config(family))
    model.config.use_cache = False
    return model.eval()


QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _count(model, pixels: dict) -> int:
    """Image tokens per image, counted with the model (newlines, pooling, resamplers)."""
    with torch.no_grad():
        feats = model.model.get_image_features(**pixels)
    feats = getattr(feats, "pooler_output", feats)
    return int(feats[0].shape[0]) if isinstance(feats, (list, tuple)) else int(feats.shape[1])


def _pixels(model, batch_size: int, gen: torch.Generator) -> tuple[dict, int]:
    """The family's image inputs for one image per row, and the image tokens per image."""
    family = model.config.model_type
    if family in QWEN:
        vc = model.config.vision_config
        grid = (1, 4, 4)  # t, h, w patches: 16 patches, merged 2x2 into 4 tokens
        per_patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        px = torch.randn(batch_size * grid[0] * grid[1] * grid[2], per_patch, generator=gen)
        thw = torch.tensor([grid] * batch_size)
        return {"pixel_values": px, "image_grid_thw": thw}, grid[1] * grid[
            2
        ] // vc.spatial_merge_size**2
    size = model.config.vision_config.image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    if family in ("idefics2", "idefics3", "smolvlm"):
        pixels = {"pixel_values": torch.randn(batch_size, 1, 3, size, size, generator=gen)}
    elif family in ("llava_next", "llava_onevision"):
        pixels = {
            "pixel_values": torch.randn(batch_size, 2, 3, size, size, generator=gen),  # base + tile
            "image_sizes": torch.tensor([[size, size]] * batch_size),
        }
    else:
        pixels = {"pixel_values": torch.randn(batch_size, 3, size, size, generator=gen)}
        if family == "mistral3":
            pixels["image_sizes"] = torch.tensor([[size, size]] * batch_size)
    return pixels, _count(model, pixels)


def image_batch(model, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """``<bos> <image>*n text...`` per row, labels on the text only, and the family's extras."""
    gen = torch.Generator().manual_seed(seed)
    pixels, n = _pixels(model, batch_size, gen)
    text = torch.randint(IMAGE_TOKEN_ID + 4, VOCAB, (batch_size, TEXT_LEN), generator=gen)
    image = torch.full((batch_size, n), IMAGE_TOKEN_ID)
    ids = torch.cat([torch.full((batch_size, 1), 1), image, text], dim=1)
    labels = ids.clone()
    labels[:, : 1 + n] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, **pixels}
    family = model.config.model_type
    is_image = (ids == IMAGE_TOKEN_ID).long()
    if family in QWEN:
        batch["mm_token_type_ids"] = is_image
    elif family == "gemma3":
        batch["token_type_ids"] = is_image
    elif family == "paligemma":  # 0: the prefix (image and prompt), 1: the supervised suffix
        batch["token_type_ids"] = (labels != -100).long()
    return batch
