"""Scores per task and the effective rank of the visual tokens, on fixed eval sets.

Question tasks are scored by accuracy: the argmax of the logits at the answer
position *restricted to the task's own answer words* (e.g. the ten digits for
``digit``, yes/no for the target). It asks "does the model still know the
answer", not "does it still use the answer format": a model that only ever says
"yes" after fine-tuning is not scored as having forgotten colours for that
reason alone. Chance is 1/len(answers).

The caption target (:mod:`.caption`) is scored on greedy generation over the
whole vocabulary: its score is the token F1, and its exact match is kept too.

Effective rank (Eq. 4 of the paper): of the matrix of the last hidden layer's
vectors at the image-token positions, stacked over every eval picture of a task,
``[num_pictures * num_image_tokens, hidden]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mdgd.metrics import effective_rank as _erank

from .caption import CaptionSplit, caption_scores
from .model import IMAGE_ID
from .tasks import ALL_TASKS, Split

if TYPE_CHECKING:
    from transformers.utils import ModelOutput


@dataclass
class Evaluation:
    score: dict[str, float]  # accuracy (question tasks) or token F1 (caption), in [0, 1]
    erank: dict[str, float]  # per task, of that task's eval pictures
    exact_match: dict[str, float] = field(default_factory=dict)  # caption tasks only


def effective_rank(z: torch.Tensor) -> float:
    return float(_erank(z))


@torch.no_grad()
def greedy(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int
) -> tuple[torch.Tensor, ModelOutput]:
    """Generate ``steps`` tokens greedily after ``batch["input_ids"]`` (the prompt).

    Returns the ``[n, steps]`` generated ids and the model output of the prompt
    (with hidden states). The model runs without a KV cache, so each token
    re-reads the short sequence: simple, and exact.
    """
    ids, first = batch["input_ids"], None
    for _ in range(steps):
        out = model(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pixel_values=batch["pixel_values"],
            output_hidden_states=first is None,
        )
        if first is None:
            first = out
        ids = torch.cat([ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, -steps:], first


def _score_batch(model, split: Split, idx: torch.Tensor):
    """The batch's scores (``{"score"}``, and ``"exact_match"`` for a caption), the model
    output with hidden states, and the input ids it saw."""
    batch = split.batch(idx)
    if isinstance(split, CaptionSplit):
        steps = split.answer.shape[1]
        prompt = {**batch, "input_ids": batch["input_ids"][:, :-steps]}
        generated, out = greedy(model, prompt, steps)
        exact, f1 = caption_scores(generated, split.answer[idx])
        return {"score": f1, "exact_match": exact}, out, prompt["input_ids"]
    out = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True)
    ids = torch.tensor(ALL_TASKS[split.task].answer_ids)
    pred = out.logits[:, -2, ids].argmax(-1)
    return {"score": float((pred == split.answer[idx]).double().mean())}, out, batch["input_ids"]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    splits: dict[str, Split],
    batch_size: int = 200,
    erank_pictures: int = 200,
) -> Evaluation:
    """The score on every split and the effective rank of its first ``erank_pictures``."""
    was_training = model.training
    model.eval()
    result = Evaluation({}, {})
    for name, split in splits.items():
        totals, visual = {}, []
        for start in range(0, len(split), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(split)))
            scores, out, ids = _score_batch(model, split, idx)
            for key, value in scores.items():
                totals[key] = totals.get(key, 0.0) + value * len(idx)
            if start < erank_pictures:
                h = out.hidden_states[-1][ids == IMAGE_ID]
                per_picture = int((ids[0] == IMAGE_ID).sum())
                visual.append(h[: (erank_pictures - start) * per_picture].float())
        result.score[name] = totals["score"] / len(split)
        if "exact_match" in totals:
            result.exact_match[name] = totals["exact_match"] / len(split)
        result.erank[name] = effective_rank(torch.cat(visual))
    model.train(was_training)
    return result
