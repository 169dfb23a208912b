"""Test helpers around the tiny LLaVA of :mod:`mdgd.testing`: a fixture, datasets, args.

The model and batch builders live in :mod:`mdgd.testing` (importable without
pytest, shared with the benchmarks and the demo); they are re-exported here so
that tests import everything tiny-LLaVA from one place.

    model = tiny_llava(seed=0)
    ref = copy.deepcopy(model)
    batch = random_batch(model.config, batch_size=2, seed=1)
"""

from __future__ import annotations

import pytest
import torch

from mdgd.testing import (  # noqa: F401  (re-exported for the tests)
    BOS_ID,
    IMAGE_TOKEN_ID,
    PAD_ID,
    num_image_tokens,
    perturbed_copy,
    random_batch,
    tiny_llava,
    tiny_llava_config,
)


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


def checkpoint_activations(model) -> None:
    """transformers' activation checkpointing on ``model``, non-reentrant.

    transformers 5.23 renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable`` and deprecated the old name (a FutureWarning,
    removed in v6); older 5.x releases, the lowest supported among them, have only
    the old name.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
