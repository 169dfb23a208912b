"""The demo's model: a small LLaVA built from a config, with a fixed word vocabulary.

No tokenizer, processor or weights are downloaded. Every prompt is a sequence of
whole words from :data:`VOCAB`:

    <bos> <image> x (image_size/patch_size)^2  w1 w2 ?  ANSWER

Every question has exactly three tokens (two words and ``?``), so every sequence
of a model has the same length and no padding is needed. The answer is a single
token, the only labelled position; accuracy reads the logits just before it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

SPECIAL = ["<pad>", "<bos>", "<eos>", "<image>", "?"]
QUESTION_WORDS = ["what", "digit", "colour", "shape", "how", "many", "where", "is", "odd", "any"]
DIGITS = [str(i) for i in range(10)]
COLOURS = ["red", "green", "blue", "yellow", "magenta", "cyan"]
SHAPES = ["square", "circle", "triangle", "cross"]
POSITIONS = ["left", "right", "top", "bottom"]
YES_NO = ["yes", "no"]

VOCAB: list[str] = SPECIAL + QUESTION_WORDS + DIGITS + COLOURS + SHAPES + POSITIONS + YES_NO
TOKEN_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = (TOKEN_ID[t] for t in ("<pad>", "<bos>", "<eos>", "<image>"))


def encode(words: list[str]) -> list[int]:
    """Token ids of a list of vocabulary words (KeyError names an unknown word)."""
    return [TOKEN_ID[w] for w in words]


@dataclass(frozen=True)
class ModelSize:
    """The knobs of the small LLaVA; everything else is fixed in :func:`build_config`."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 4
    heads: int = 4

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


def build_config(size: ModelSize):
    """A ``LlavaConfig`` with a CLIP vision tower and a Llama language model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=size.image_size,
        patch_size=size.patch_size,
        num_channels=3,
        hidden_size=size.vision_hidden,
        intermediate_size=2 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.heads,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=size.text_hidden,
        intermediate_size=2 * size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=64,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def build_model(size: ModelSize, seed: int) -> torch.nn.Module:
    """A randomly initialised ``LlavaForConditionalGeneration`` (deterministic in ``seed``)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(size))
    model.config.use_cache = False
    return model


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
