"""Tiny LLaVA models built from a config, and random batches, for tests and benchmarks.

No downloads: a CLIP vision tower and a Llama language model with random weights.
The tests (``tests/helpers/llava_tiny.py`` re-exports these), the benchmarks and the demo
(:mod:`mdgd.demo.model`, with its own vocabulary and sizes) build their models here.
Importing this module needs neither pytest nor transformers (imported on use).

    model = tiny_llava(seed=0)
    ref = copy.deepcopy(model)
    batch = random_batch(model.config, batch_size=2, seed=1)
"""

from __future__ import annotations

import copy

import torch

IMAGE_TOKEN_ID = 3
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def tiny_llava_config(
    *,
    image_size: int = 16,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 1,
    text_hidden: int = 32,
    text_layers: int = 3,
    heads: int = 2,
    vocab_size: int = 64,
    vision_intermediate: int | None = None,
    text_intermediate: int | None = None,
    vision_heads: int | None = None,
    tie_word_embeddings: bool = False,
    attention_dropout: float = 0.0,
    max_position_embeddings: int = 128,
    image_token_id: int = IMAGE_TOKEN_ID,
    pad_id: int = PAD_ID,
    bos_id: int = BOS_ID,
    eos_id: int = EOS_ID,
):
    """A ``LlavaConfig`` with ``(image_size // patch_size) ** 2`` image tokens per image.

    The MLP widths default to twice the hidden sizes and the vision tower's heads to
    ``heads``; give them to build a model with a real LLaVA's shapes (the step benchmark's
    ``--llava-7b``: CLIP ViT-L/14-336 widths, Llama-7B widths).
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads or heads,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=tie_word_embeddings,
        attention_dropout=attention_dropout,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tiny_llava(seed: int = 0, dtype: torch.dtype = torch.float32, device=None, **config_kwargs):
    """A random ``LlavaForConditionalGeneration`` (deterministic in ``seed``).

    ``device``: where the weights are created and initialised (default: the CPU); a
    model of a billion parameters initialises in seconds on a GPU, minutes on a CPU.
    """
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = tiny_llava_config(**config_kwargs)
    with torch.device(device or "cpu"):
        model = LlavaForConditionalGeneration(config)
    model.config.use_cache = False
    return model.to(dtype)


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]  # ids PAD_ID .. IMAGE_TOKEN_ID
# LLaVA-1.5's conversation format; the answer ends with </s>
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{{ '</s>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def with_specials(tokenizer, chat_template: str = LLAVA_CHAT_TEMPLATE):
    """``tokenizer`` with :data:`SPECIAL_TOKENS` as pad/bos/eos/unk/image, and the template."""
    tokenizer.add_special_tokens(
        {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = chat_template
    return tokenizer


def word_tokenizer(words: list[str], chat_template: str = LLAVA_CHAT_TEMPLATE):
    """A word-level fast tokenizer over :data:`SPECIAL_TOKENS` and ``words``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + sorted(set(words) - set(SPECIAL_TOKENS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return with_specials(PreTrainedTokenizerFast(tokenizer_object=tok), chat_template)


def save_tiny_llava_checkpoint(path, words: list[str], seed: int = 0, **config_kwargs):
    """A tiny LLaVA-1.5 checkpoint ``mdgd train --model`` loads: :func:`tiny_llava`, a
    :func:`word_tokenizer` over ``words``, a 16-pixel CLIP image processor and the
    LLaVA-1.5 chat template, saved with ``save_pretrained`` in ``path``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer = word_tokenizer(words)
    config_kwargs.setdefault("image_size", 16)
    side = config_kwargs["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ),
        tokenizer=tokenizer,
        patch_size=config_kwargs.get("patch_size", 8),
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by "default"
    )
    model = tiny_llava(seed, vocab_size=len(tokenizer), **config_kwargs)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def num_image_tokens(config) -> int:
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2


def random_batch(
    config, batch_size: int = 2, text_len: int = 6, seed: int = 0, device="cpu"
) -> dict[str, torch.Tensor]:
    """``<bos> <image>*n  text...`` with labels on the text tokens only (-100 elsewhere)."""
    gen = torch.Generator().manual_seed(seed)
    n_img = num_image_tokens(config)
    vocab = config.text_config.vocab_size
    text = torch.randint(IMAGE_TOKEN_ID + 1, vocab, (batch_size, text_len), generator=gen)
    ids = torch.cat(
        [
            torch.full((batch_size, 1), BOS_ID),
            torch.full((batch_size, n_img), IMAGE_TOKEN_ID),
            text,
        ],
        dim=1,
    )
    labels = ids.clone()
    labels[:, : 1 + n_img] = -100
    vc = config.vision_config
    pixels = torch.randn(batch_size, 3, vc.image_size, vc.image_size, generator=gen)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "labels": labels,
    }
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def perturbed_copy(model, scale: float = 0.02, seed: int = 0):
    """A deep copy of ``model`` with every parameter perturbed (so that L_v != 0)."""
    gens: dict[torch.device, torch.Generator] = {}  # one per device: noise made where p is
    out = copy.deepcopy(model)
    for p in out.parameters():
        if p.device not in gens:
            gens[p.device] = torch.Generator(p.device).manual_seed(seed)
        noise = torch.randn(p.shape, generator=gens[p.device], dtype=torch.float32, device=p.device)
        p.add_(noise.to(p.dtype) * scale)
    return out
