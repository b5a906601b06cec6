"""Parameter blends: student EMA and fake-score blend (docs/method.md)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import nn

from cdm.ema import blend_, ema_decay


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_ema_decay_values() -> None:
    assert ema_decay(0) == pytest.approx(0.1)
    assert ema_decay(90) == pytest.approx(0.91)
    assert ema_decay(10**6) == 0.999
    assert ema_decay(10**6, max_decay=0.99) == 0.99
    values = [ema_decay(n) for n in range(0, 20000, 50)]
    assert all(b >= a for a, b in pairwise(values))
    with pytest.raises(ValueError):
        ema_decay(-1)


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.999, 1.0])
def test_blend_formula(keep: float) -> None:
    target, source = _net(0), _net(1)
    before = {k: v.detach().clone() for k, v in target.named_parameters()}
    src = {k: v.detach().clone() for k, v in source.named_parameters()}
    blend_(target, source, keep)
    for name, p in target.named_parameters():
        expected = keep * before[name] + (1 - keep) * src[name]
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=0)
        assert torch.equal(dict(source.named_parameters())[name].detach(), src[name])


def test_blend_endpoints_exact() -> None:
    target, source = _net(0), _net(1)
    before = [p.detach().clone() for p in target.parameters()]
    blend_(target, source, 1.0)
    assert all(torch.equal(p, b) for p, b in zip(target.parameters(), before, strict=True))
    blend_(target, source, 0.0)
    assert all(
        torch.equal(p, s) for p, s in zip(target.parameters(), source.parameters(), strict=True)
    )


def test_blend_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="parameter names"):
        blend_(_net(0), nn.Linear(3, 4), 0.5)
    with pytest.raises(ValueError, match="keep"):
        blend_(_net(0), _net(1), 1.5)
