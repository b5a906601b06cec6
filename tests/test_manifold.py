"""Improved precision/recall on cases that can be counted by hand."""

from __future__ import annotations

import pytest
import torch

from cdm.metrics.manifold import knn_radii, precision_recall


def test_identical_sets_are_fully_covered() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)


def test_far_away_set_is_not_covered() -> None:
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x + 1e3) == (0.0, 0.0)


def _line(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)[:, None]


def test_one_dimensional_counts_k1() -> None:
    # Real radii (k=1) are all 1: the balls cover [-1, 5]; only 4.5 of the fakes is inside.
    # Fake radii are all 1: balls [3.5,5.5], [4.5,6.5], [6,8], [7,9]; only real 4 is inside.
    real, fake = _line(0, 1, 2, 3, 4), _line(4.5, 5.5, 7, 8)
    assert knn_radii(real, 1).tolist() == [1, 1, 1, 1, 1]
    assert precision_recall(real, fake, k=1) == (0.25, 0.2)


def test_one_dimensional_counts_k2_excludes_self() -> None:
    # Real radii (k=2): 2, 1, 1, 1, 2 -> union [-2, 6]: fakes 4.5 and 5.5 inside.
    # Fake radii (k=2): 2.5, 1.5, 1.5, 2.5 -> union [2, 10.5]: reals 2, 3, 4 inside.
    real, fake = _line(0, 1, 2, 3, 4), _line(4.5, 5.5, 7, 8)
    assert knn_radii(real, 2).tolist() == [2, 1, 1, 1, 2]
    assert knn_radii(fake, 2).tolist() == [2.5, 1.5, 1.5, 2.5]
    assert precision_recall(real, fake, k=2) == (0.5, 0.6)


def test_chunked_matches_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(50, 4, generator=g), torch.randn(40, 4, generator=g) + 0.5
    whole = precision_recall(real, fake)
    monkeypatch.setattr("cdm.metrics.manifold.CHUNK", 7)
    assert precision_recall(real, fake) == whole


@pytest.mark.parametrize("k", [0, -1, 5, 9])
def test_invalid_k_raises(k: int) -> None:
    with pytest.raises(ValueError, match="k must satisfy") as info:
        precision_recall(torch.zeros(5, 2), torch.zeros(6, 2), k=k)
    assert "\n" not in str(info.value)


def test_mismatched_features_raise() -> None:
    with pytest.raises(ValueError, match="equal D"):
        precision_recall(torch.zeros(5, 2), torch.zeros(5, 3))
