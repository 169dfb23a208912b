"""One rank of the modality-grouped sampler's 2-rank resume test (tests/test_sampler.py).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p \\
        python tests/helpers/sampler_resume_worker.py OUT

MDGDTrainer (mode "ft", ``group_by_modality_length=True``, batch 1, accumulation 2)
trains 2 epochs of :data:`KINDS` (13 samples, 1 repeated: 7 micro-batches and 4
optimizer steps per rank and epoch) with a checkpoint after step 5, one step into the
second epoch; then a new Trainer resumes from that checkpoint. ``OUT/resume-<rank>.json``:
the dataset indices of every micro-batch this rank trained on, in the uninterrupted
run (``"full"``) and after resuming (``"resumed"``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from launch import run_rank  # noqa: E402
from llava_tiny import MixedExamples, collate, tiny_llava, trainer_args  # noqa: E402

from mdgd import MDGDConfig  # noqa: E402
from mdgd.integrations.hf import MDGDTrainer  # noqa: E402

KINDS = "IITIIITTIIITI"  # 8 with an image, 5 text-only
STEPS, SAVE_AT = 8, 5


class Lengths(MixedExamples):
    """MixedExamples with LLaVA's modality_lengths (made-up lengths)."""

    def __init__(self, config, kinds: str) -> None:
        super().__init__(config, kinds)
        self.modality_lengths = [
            (k % 5 + 1) * (1 if kind == "I" else -1) for k, kind in enumerate(kinds)
        ]


class Recording(MDGDTrainer):
    """Keeps the dataset indices of every micro-batch it trains on."""

    def __init__(self, *args: Any, rows: dict[tuple, int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rows, self.seen = rows, []

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append([self.rows[tuple(ids.tolist())] for ids in inputs["input_ids"]])
        return super().training_step(model, inputs, num_items_in_batch)


def train(out: str, name: str, resume: str | None = None) -> list[list[int]]:
    model = tiny_llava(seed=0)
    data = Lengths(model.config, KINDS)
    rows = {tuple(data[i]["input_ids"].tolist()): i for i in range(len(data))}
    assert len(rows) == len(data), "the samples' tokens must tell them apart"
    args = trainer_args(
        os.path.join(out, name),
        per_device_train_batch_size=1,
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=SAVE_AT,
        data_seed=5,
        ddp_backend="gloo",
        ddp_timeout=60,
    )
    trainer = Recording(
        model=model,
        mdgd_config=MDGDConfig(mode="ft", dist_timeout_s=60),
        args=args,
        train_dataset=data,
        data_collator=collate,
        group_by_modality_length=True,
        rows=rows,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer.seen


def main() -> None:
    out, rank = sys.argv[1], int(os.environ["RANK"])
    torch.set_num_threads(1)

    def body() -> None:
        result = {"full": train(out, "full")}
        checkpoint = os.path.join(out, "full", f"checkpoint-{SAVE_AT}")
        result["resumed"] = train(out, "resumed", checkpoint)
        with open(os.path.join(out, f"resume-{rank}.json"), "w") as f:
            json.dump(result, f)

    run_rank(body)


if __name__ == "__main__":
    main()
