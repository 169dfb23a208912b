"""mdgd.metrics: effective rank (Eq. 4) and the paper's H-score."""

from __future__ import annotations

import math

import pytest
import torch

from mdgd.metrics import effective_rank, h_score


def test_effective_rank_of_identity_is_its_size():
    assert effective_rank(torch.eye(7)).item() == pytest.approx(7.0, rel=1e-12)


def test_effective_rank_of_rank_one_is_one():
    u, v = torch.randn(20, 1), torch.randn(1, 9)
    assert effective_rank(u @ v).item() == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_matches_eq4_and_is_scale_invariant():
    sigma = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    r, _ = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))
    Z = q @ torch.diag(sigma) @ r.T  # singular values exactly sigma
    p = sigma / sigma.sum()
    want = math.exp(-(p * p.log()).sum().item())
    assert effective_rank(Z).item() == pytest.approx(want, rel=1e-10)
    assert effective_rank(1e-3 * Z.float()).item() == pytest.approx(want, rel=1e-5)


def test_effective_rank_batched_and_bad_input():
    Z = torch.stack([torch.eye(3), torch.diag(torch.tensor([1.0, 0.0, 0.0]))])
    assert effective_rank(Z).tolist() == pytest.approx([3.0, 1.0])
    with pytest.raises(ValueError, match="all-zero"):
        effective_rank(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="matrix"):
        effective_rank(torch.ones(3))


# (pre-trained task scores, target score, printed H-score), from the paper's tables
TABLE1 = [  # LLaVA-1.5: GQA VizWiz SQA TextVQA POPE MMBench | Flickr30k or OKVQA
    ([61.94, 50.00, 66.80, 58.27, 85.90, 64.30], 3.5, 59.86),
    ([56.26, 44.45, 28.34, 38.98, 38.40, 50.56], 78.82, 45.26),
    ([67.71, 48.18, 69.05, 57.32, 85.12, 65.43], 73.47, 66.03),
    ([69.89, 51.22, 65.87, 58.18, 84.39, 66.42], 64.18, 65.86),
    ([61.94, 50.00, 66.80, 58.27, 85.90, 64.30], 0.14, 59.58),
]
TABLE2 = [  # MiniCPM-V: VizWiz A-OKVQA OKVQA TextVQA IconQA POPE MMBench | TextCaps
    ([55.27, 79.39, 64.86, 77.98, 79.01, 88.93, 70.98], 15.77, 25.50),
    ([52.03, 77.73, 59.16, 67.24, 78.67, 88.20, 71.42], 33.85, 44.76),
    ([53.30, 78.17, 63.99, 77.68, 78.28, 87.31, 69.23], 32.41, 43.80),
]


@pytest.mark.parametrize("pre, target, want", TABLE1, ids=lambda x: "")
def test_h_score_reproduces_table1(pre, target, want):
    assert h_score(pre, target) == pytest.approx(want, abs=0.01)


@pytest.mark.parametrize("pre, target, want", TABLE2, ids=lambda x: "")
def test_h_score_reproduces_table2(pre, target, want):
    assert h_score(pre, [target], form="table2") == pytest.approx(want, abs=0.01)


def test_h_score_edge_cases():
    assert h_score([0.0], 0.0) == 0.0
    with pytest.raises(ValueError, match="form"):
        h_score([1.0], 1.0, form="table3")
    with pytest.raises(ValueError, match="at least one"):
        h_score([], 1.0)
