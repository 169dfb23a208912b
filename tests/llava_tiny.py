"""A tiny ``LlavaForConditionalGeneration`` built from a config, and random batches.

No downloads: a CLIP vision tower and a Llama language model with random weights.
Shared by the driver tests and ``benchmarks/bench_step.py``; other tests may reuse it.

    model = tiny_llava(seed=0)
    ref = copy.deepcopy(model)
    batch = random_batch(model.config, batch_size=2, seed=1)
"""

from __future__ import annotations

import copy

import pytest
import torch

IMAGE_TOKEN_ID = 3
PAD_ID, BOS_ID = 0, 1


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
    tie_word_embeddings: bool = False,
    attention_dropout: float = 0.0,
):
    """A ``LlavaConfig`` with ``(image_size // patch_size) ** 2`` image tokens per image."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=2,
        tie_word_embeddings=tie_word_embeddings,
        attention_dropout=attention_dropout,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )


def tiny_llava(seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A random ``LlavaForConditionalGeneration`` (deterministic in ``seed``)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**config_kwargs))
    model.config.use_cache = False
    return model.to(dtype)


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
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread, then restore the setting.

    Tiny models gain nothing from two threads, and on a shared 2-core machine the
    threads wait for each other: a tiny MDGD step measured 20-50 ms on one thread
    and 0.4-8 s on two. Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``
    and ``from llava_tiny import one_thread  # noqa: F401``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Examples(torch.utils.data.Dataset):
    """Single examples cut from fixed random batches (same length, no padding)."""

    def __init__(self, config, n: int, seed: int = 0) -> None:
        batch = random_batch(config, batch_size=n, seed=seed)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def trainer_args(output_dir, **kw):
    """``TrainingArguments`` for CPU tests: accumulation 2, constant lr, no saving or
    reporting, seeded; ``kw`` overrides."""
    import transformers

    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def text_only_batch(
    config, batch_size: int = 2, text_len: int = 6, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A batch of the same length as :func:`random_batch`'s, with no image at all."""
    gen = torch.Generator().manual_seed(seed)
    n = num_image_tokens(config) + text_len
    vocab = config.text_config.vocab_size
    text = torch.randint(IMAGE_TOKEN_ID + 1, vocab, (batch_size, n), generator=gen)
    ids = torch.cat([torch.full((batch_size, 1), BOS_ID), text], dim=1)
    labels = ids.clone()
    labels[:, : 1 + n // 2] = -100  # the "question" half is not supervised
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def unsupervised(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every label -100 (a truncated answer)."""
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


class MixedExamples(torch.utils.data.Dataset):
    """Examples in the order of ``kinds``: ``"I"`` has an image, ``"T"`` is text-only."""

    def __init__(self, config, kinds: str, seed: int = 0) -> None:
        img = random_batch(config, batch_size=len(kinds), seed=seed)
        txt = text_only_batch(config, batch_size=len(kinds), seed=seed + 1)
        self.rows = [
            {k: v[i] for k, v in (img if kind == "I" else txt).items()}
            for i, kind in enumerate(kinds)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack equal-length rows; ``pixel_values`` of the rows that have an image only."""
    out = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}
    pixels = [r["pixel_values"] for r in rows if "pixel_values" in r]
    if pixels:
        out["pixel_values"] = torch.stack(pixels)
    return out
