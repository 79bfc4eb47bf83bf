"""The Hungarian matcher against brute force, and with empty targets."""
import itertools

import pytest
import torch

from ddetr.models.matcher import HungarianMatcher


def random_case(N, Lq, sizes, num_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    outputs = {"pred_logits": torch.randn(N, Lq, num_classes, generator=gen),
               "pred_boxes": torch.rand(N, Lq, 4, generator=gen) * 0.5 + 0.25}
    targets = [{"labels": torch.randint(0, num_classes, (T,), generator=gen),
                "boxes": torch.rand(T, 4, generator=gen) * 0.5 + 0.25} for T in sizes]
    return outputs, targets


def brute_force(cost):
    """Least-cost assignment of the T columns to distinct rows, by enumeration."""
    Lq, T = cost.shape
    best = min(itertools.permutations(range(Lq), T),
               key=lambda rows: sum(cost[r, c].item() for c, r in enumerate(rows)))
    return sum(cost[r, c].item() for c, r in enumerate(best))


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    sizes = [3, 1, 4]
    outputs, targets = random_case(3, 6, sizes, seed=seed)
    indices = matcher(outputs, targets)
    cost = matcher.cost_matrix(outputs, targets).view(3, 6, -1)
    for i, (cost_i, (rows, cols)) in enumerate(zip(cost.split(sizes, -1), indices)):
        c = cost_i[i]
        assert len(rows) == len(cols) == sizes[i]
        assert len(set(rows.tolist())) == sizes[i]  # one object per query
        assert sorted(cols.tolist()) == list(range(sizes[i]))
        assert c[rows, cols].sum().item() == pytest.approx(brute_force(c), abs=1e-4)


def test_cost_terms():
    """A perfect box at a confident query costs less than anything else."""
    outputs, targets = random_case(1, 4, [1])
    outputs["pred_boxes"][0, 2] = targets[0]["boxes"][0]
    outputs["pred_logits"][0, 2, targets[0]["labels"][0]] = 8.0
    (rows, cols), = HungarianMatcher()(outputs, targets)
    assert rows.tolist() == [2] and cols.tolist() == [0]


def test_empty_targets():
    matcher = HungarianMatcher()
    outputs, targets = random_case(2, 5, [0, 0])
    for rows, cols in matcher(outputs, targets):
        assert rows.numel() == cols.numel() == 0 and rows.dtype == torch.int64
    outputs, targets = random_case(2, 5, [0, 2])
    (r0, c0), (r1, c1) = matcher(outputs, targets)
    assert r0.numel() == 0 and len(r1) == 2


def test_more_targets_than_queries_matches_every_query():
    outputs, targets = random_case(1, 3, [5])
    (rows, cols), = HungarianMatcher()(outputs, targets)
    assert sorted(rows.tolist()) == [0, 1, 2] and len(set(cols.tolist())) == 3
