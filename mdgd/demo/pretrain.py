"""Phase 1: train the small LLaVA on the pre-trained tasks, and cache the result.

The whole model (vision tower, projector, language model) is trained from random
weights on an even mix of the pre-trained tasks (never the target task) with
AdamW, linear warm-up and cosine decay. The weights go to
``<cache_dir>/pretrained-<key>.safetensors`` beside a JSON file of what produced
them; ``<key>`` hashes everything that changes the weights: the model size, the
phase-1 settings, the seed, the package version and the source of the modules
that draw the data, build the model and train it. A second run with the same key
loads the file instead of training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .model import ModelSize, build_model
from .tasks import PRETRAINED_TASKS, Split, make_split


@dataclass(frozen=True)
class PretrainSettings:
    steps: int = 1500
    batch_size: int = 40
    lr: float = 5e-4
    warmup: int = 100
    train_per_task: int = 2000


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mdgd"


def code_version() -> str:
    """Package version plus a hash of the source files that shape the pre-trained weights."""
    import mdgd

    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("model.py", "tasks.py", "pretrain.py"):
        h.update((here / name).read_bytes())
    return f"{mdgd.__version__}+{h.hexdigest()[:12]}"


def cache_key(size: ModelSize, settings: PretrainSettings, seed: int) -> str:
    import transformers

    blob = json.dumps(
        {
            "size": size.to_dict(),
            "settings": asdict(settings),
            "seed": seed,
            "code": code_version(),
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def concat(splits: list[Split]) -> Split:
    return Split(
        "+".join(s.task for s in splits),
        torch.cat([s.input_ids for s in splits]),
        torch.cat([s.pixel_values for s in splits]),
        torch.cat([s.labels for s in splits]),
        torch.cat([s.answer for s in splits]),
    )


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(
    size: ModelSize, settings: PretrainSettings, seed: int, progress: bool = True
) -> tuple[torch.nn.Module, dict]:
    """Train a fresh model on the pre-trained tasks; returns it and a summary."""
    model = build_model(size, seed)
    data = concat(
        [
            make_split(
                t, settings.train_per_task, seed, "train", size.image_size, size.num_image_tokens
            )
            for t in PRETRAINED_TASKS
        ]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, settings.steps, settings.warmup)
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(settings.steps), desc="phase 1: pre-train", disable=not progress, unit="step")
    for _ in bar:
        batch = data.batch(torch.randint(0, len(data), (settings.batch_size,), generator=gen))
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    model.eval()
    summary = {
        "seconds": time.perf_counter() - start,
        "steps": settings.steps,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
    }
    return model, summary


def load_or_pretrain(
    size: ModelSize,
    settings: PretrainSettings,
    seed: int,
    cache_dir: Path | None,
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """The pre-trained model from the cache, or trained now and cached.

    ``cache_dir=None`` disables the cache. The summary says ``from_cache`` and
    where the file is.
    """
    from safetensors.torch import load_model, save_model

    key = cache_key(size, settings, seed)
    path = meta_path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"pretrained-{key}.safetensors"
        meta_path = path.with_suffix(".json")
        if path.exists() and meta_path.exists():
            model = build_model(size, seed)
            load_model(model, str(path))
            model.eval()
            summary = json.loads(meta_path.read_text())
            return model, {**summary, "from_cache": True, "path": str(path), "key": key}
    model, summary = pretrain(size, settings, seed, progress)
    summary = {**summary, "key": key, "code": code_version(), "settings": asdict(settings)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write then rename (atomic): a killed or concurrent run never leaves half a file
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_model(model, str(tmp))
        os.replace(tmp, path)
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, meta_path)
    return model, {**summary, "from_cache": False, "path": str(path) if path else None}
