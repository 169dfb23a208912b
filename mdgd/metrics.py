"""Metrics the MDGD paper reports: effective rank (Eq. 4) and the H-score.

* :func:`effective_rank`: ``erank(Z) = exp(-sum_i p_i log p_i)``, ``p_i = sigma_i / sum_j sigma_j``
  over the singular values of a representation matrix ``Z`` (Roy & Vetterli, 2007).
  The paper computes it on the last hidden layer at the image-token positions,
  ``[num_image_tokens, hidden]`` (the engine's visual representation).
* :func:`h_score`: the harmonic mean the paper's tables report beside the average.
  The two tables use two different pairs of averages (checked against every
  row, to the printed 0.01):

  - ``form="table1"`` (LLaVA-1.5, Table 1): ``H(mean(pretrained), mean(all))``;
  - ``form="table2"`` (MiniCPM-V, Table 2): ``H(mean(all), mean(target))``,

  where ``all`` is the pre-trained tasks and the target task(s) together and
  ``H(a, b) = 2ab / (a + b)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

H_FORMS = ("table1", "table2")


def effective_rank(Z: torch.Tensor) -> torch.Tensor:
    """Effective rank (Eq. 4) of ``Z`` (``[n, d]``, or ``[..., n, d]`` for a batch), in float64.

    Between 1 (rank one) and ``min(n, d)`` (all singular values equal); invariant
    to the scale of ``Z``. Raises ValueError for an all-zero matrix (undefined).
    """
    if Z.dim() < 2:
        raise ValueError(
            f"Z must be a matrix [n, d] (or a batch of them), got shape {tuple(Z.shape)}"
        )
    sigma = torch.linalg.svdvals(Z.detach().to(torch.float64))
    total = sigma.sum(dim=-1, keepdim=True)
    if bool((total == 0).any()):
        raise ValueError("the effective rank of an all-zero matrix is undefined")
    p = sigma / total
    entropy = -torch.where(p > 0, p * torch.log(p), 0.0).sum(dim=-1)  # 0 log 0 = 0
    return torch.exp(entropy)


def _mean(x: float | Sequence[float]) -> tuple[float, int]:
    vals = [float(x)] if isinstance(x, (int, float)) else [float(v) for v in x]
    if not vals:
        raise ValueError("h_score needs at least one score in each group")
    return sum(vals) / len(vals), len(vals)


def _harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def h_score(
    pretrained: float | Sequence[float],
    target: float | Sequence[float],
    *,
    form: str = "table1",
) -> float:
    """The paper's H-score from the pre-trained-task scores and the target-task score(s).

    ``form="table1"`` (default, the LLaVA-1.5 table): harmonic mean of the
    pre-trained average and the overall average. ``form="table2"`` (the MiniCPM
    table): harmonic mean of the overall average and the target average.
    """
    if form not in H_FORMS:
        raise ValueError(f"form must be one of {H_FORMS}, got {form!r}")
    pre, n_pre = _mean(pretrained)
    tgt, n_tgt = _mean(target)
    overall = (pre * n_pre + tgt * n_tgt) / (n_pre + n_tgt)
    return _harmonic(pre, overall) if form == "table1" else _harmonic(overall, tgt)
