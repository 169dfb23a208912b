"""Accuracy per task and the effective rank of the visual tokens, on fixed eval sets.

Accuracy: the argmax of the logits at the answer position *restricted to the
task's own answer words* (e.g. the ten digits for ``digit``, yes/no for the
target). It asks "does the model still know the answer", not "does it still use
the answer format": a model that only ever says "yes" after fine-tuning is not
scored as having forgotten colours for that reason alone. Chance is
1/len(answers).

Effective rank (Eq. 4 of the paper): of the matrix of the last hidden layer's
vectors at the image-token positions, stacked over every eval picture of a task,
``[num_pictures * num_image_tokens, hidden]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mdgd.metrics import effective_rank as _erank

from .model import IMAGE_ID
from .tasks import ALL_TASKS, Split


@dataclass
class Evaluation:
    accuracy: dict[str, float]
    erank: dict[str, float]  # per task, of that task's eval pictures


def effective_rank(z: torch.Tensor) -> float:
    return float(_erank(z))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    splits: dict[str, Split],
    batch_size: int = 200,
    erank_pictures: int = 200,
) -> Evaluation:
    """Accuracy on every split and the effective rank of its first ``erank_pictures``."""
    was_training = model.training
    model.eval()
    acc, erank = {}, {}
    for name, split in splits.items():
        ids = torch.tensor(ALL_TASKS[name].answer_ids)
        correct, visual = 0, []
        for start in range(0, len(split), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(split)))
            batch = split.batch(idx)
            out = model(
                **{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True
            )
            pred = out.logits[:, -2, ids].argmax(-1)
            correct += int((pred == split.answer[idx]).sum())
            if start < erank_pictures:
                h = out.hidden_states[-1][batch["input_ids"] == IMAGE_ID]
                visual.append(h[: (erank_pictures - start) * _tokens_per_picture(batch)].float())
        acc[name] = correct / len(split)
        erank[name] = effective_rank(torch.cat(visual))
    model.train(was_training)
    return Evaluation(acc, erank)


def _tokens_per_picture(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["input_ids"][0] == IMAGE_ID).sum())
