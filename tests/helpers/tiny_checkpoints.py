"""Tiny vision-language checkpoints and a LLaVA-format dataset, written to disk for ``mdgd train``.

No downloads: a word-level (LLaVA) or byte-level BPE (LLaVA-NeXT) tokenizer is
built with the ``tokenizers`` library, the image processor and processor from
their constructors, the model from a config with random weights; everything is
saved with ``save_pretrained`` so that ``from_pretrained`` (and ``mdgd train
--model DIR``) load it offline.

    write_dataset(root)                       # root/data.json, root/images/*.png
    save_tiny_model("llava", root / "llava")  # a checkpoint directory
    run(*parse(flags(root, out)))             # mdgd.train.run on them, a short CPU run

The dataset has 48 samples: a third text-only, some multi-turn; every answer is
one word that a tiny model can learn in a few steps (the colour of the picture,
or a word from the question).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from vlm_tiny import TEXT, VIT

from mdgd import testing
from mdgd.testing import LLAVA_CHAT_TEMPLATE, SPECIAL_TOKENS

IMAGE_TOKEN = "<image>"
SPECIALS = SPECIAL_TOKENS
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "black": (5, 5, 5)}
SHAPES = ("square", "dot")
WORDS = ["one", "two", "three", "four", "five", "six"]
N_SAMPLES = 48

CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE


def _picture(colour: str, shape: str, size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.integers(200, 255, (h, w, 3), dtype=np.uint8)
    r, g, b = COLOURS[colour]
    pad = 2 if shape == "square" else h // 3
    img[pad : h - pad, pad : w - pad] = (r, g, b)
    return img


def samples() -> list[dict]:
    """The 48 LLaVA-format samples (image file names ``images/<id>.png``)."""
    out = []
    colours = list(COLOURS)
    for i in range(N_SAMPLES):
        sid = f"s{i:02d}"
        if i % 3 == 2:  # text-only: repeat a word of the question
            word = WORDS[i % len(WORDS)]
            out.append(
                {
                    "id": sid,
                    "conversations": [
                        {"from": "human", "value": f"say {word}"},
                        {"from": "gpt", "value": word},
                    ],
                }
            )
            continue
        colour, shape = colours[i % 4], SHAPES[(i // 4) % 2]
        conv = [
            {"from": "human", "value": f"{IMAGE_TOKEN}\nwhat colour is the {shape} ?"},
            {"from": "gpt", "value": colour},
        ]
        if i % 4 == 1:  # multi-turn
            conv += [
                {"from": "human", "value": "and the shape ?"},
                {"from": "gpt", "value": shape},
            ]
        out.append({"id": sid, "image": f"{sid}.png", "conversations": conv})
    return out


def write_dataset(root: Path, image_sizes: tuple[tuple[int, int], ...] = ((16, 16),)) -> Path:
    """Write ``root/data.json`` and ``root/images/*.png``; returns the JSON path."""
    from PIL import Image

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    data = samples()
    for i, s in enumerate(data):
        if "image" in s:
            colour = s["conversations"][1]["value"]
            shape = "square" if "square" in s["conversations"][0]["value"] else "dot"
            size = image_sizes[i % len(image_sizes)]
            Image.fromarray(_picture(colour, shape, size, seed=i)).save(images / s["image"])
    path = root / "data.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def _vocabulary() -> list[str]:
    words = set("USER ASSISTANT : ? what colour is the and shape say".split())
    words |= set(COLOURS) | set(SHAPES) | set(WORDS)
    return SPECIALS + sorted(words)


def word_tokenizer():
    """A word-level fast tokenizer over the dataset's words (readable token lists in tests)."""
    return testing.word_tokenizer(_vocabulary()[len(SPECIALS) :])


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained on the dataset's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(_vocabulary()[len(SPECIALS) :])] * 4
    corpus += [t["value"] for s in samples() for t in s["conversations"]]
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return _fast(PreTrainedTokenizerFast(tokenizer_object=tok))


def _fast(tokenizer):
    return testing.with_specials(tokenizer, CHAT_TEMPLATE)


def _clip():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**VIT, projection_dim=32)  # 16x16 pictures, 8x8 patches


def _llama(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        **{
            **TEXT,
            "vocab_size": len(tokenizer),
            "num_hidden_layers": 3,  # --train-layers 2 leaves one frozen
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        tie_word_embeddings=False,
    )


def _assemble(classes, image_processor, tokenizer, seed: int, **config_kw):
    """(model, processor) of one LLaVA-style family: CLIP 16x16/8 tower, tiny Llama."""
    config_cls, model_cls, processor_cls = classes
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by "default"
    )
    config = config_cls(
        vision_config=_clip(),
        text_config=_llama(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        **config_kw,
    )
    torch.manual_seed(seed)
    return model_cls(config), processor


def build_llava(seed: int = 0):
    """(model, processor): LLaVA-1.5 in miniature (4 image tokens per image), word tokenizer."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    classes = (LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)
    return _assemble(classes, image_processor, word_tokenizer(), seed)


def build_llava_next(seed: int = 0):
    """(model, processor): LLaVA-NeXT (any-resolution tiles) in miniature, BPE tokenizer."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    pinpoints = [[16, 16], [16, 32], [32, 16]]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 16},
        crop_size={"height": 16, "width": 16},
        image_grid_pinpoints=pinpoints,
    )
    classes = (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor)
    return _assemble(
        classes, image_processor, bpe_tokenizer(), seed, image_grid_pinpoints=pinpoints
    )


BUILDERS = {"llava": build_llava, "llava_next": build_llava_next}
# LLaVA-NeXT gets pictures of two aspect ratios (different tile grids and token counts)
IMAGE_SIZES = {"llava": ((16, 16),), "llava_next": ((16, 16), (16, 32))}


def save_tiny_model(family: str, path: Path, seed: int = 0) -> Path:
    """Build the tiny ``family`` model and save it with its processor to ``path``."""
    model, processor = BUILDERS[family](seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_all(tmp_path_factory) -> dict[str, Path]:
    """{family: folder with data.json, images/ and model/} (for a pytest fixture)."""
    out = {}
    for family in BUILDERS:
        d = tmp_path_factory.mktemp(family)
        write_dataset(d, IMAGE_SIZES[family])
        save_tiny_model(family, d / "model")
        out[family] = d
    return out


def flags(d: Path, out: Path, mode: str = "mdgd", **kw) -> list[str]:
    """The ``mdgd train`` command line of a short, seeded, CPU run on ``d``'s data."""
    base = {
        "model": d / "model",
        "data": d / "data.json",
        "image-folder": d / "images",
        "mode": mode,
        "output_dir": out,
        "train-layers": 2,
        "max_steps": 12,
        "per_device_train_batch_size": 2,  # some micro-batches are text-only
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "logging_steps": 1,
        "monitor-steps": 4,
        "monitor-samples": 8,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": "true",
        "seed": 0,
        "dataloader_num_workers": 0,
        "use_cpu": "true",
    }
    base.update(kw)
    return [a for k, v in base.items() if v is not None for a in (f"--{k}", str(v))]


def parse(argv: list[str]):
    """(TrainArguments, TrainingArguments) of an ``mdgd train`` command line."""
    from mdgd.train import build_parser

    return build_parser().parse_args_into_dataclasses(args=argv)
