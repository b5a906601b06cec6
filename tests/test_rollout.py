import torch

from cdm.conditioning import Condition
from cdm.rollout import evals_needed, full_rollout, rollout
from cdm.schedules import draw_anchor, dynamic_schedule, fixed_schedule
from cdm.velocity import TransformerVelocity
from cdm.world.teacher import tiny_transformer


class Counting(torch.nn.Module):
    """Counts the sample-evaluations of a velocity network."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.evals, self.calls = inner, 0, 0

    def forward(self, x, sigma, cond):
        self.evals += len(x)
        self.calls += 1
        return self.inner(x, sigma, cond)


def _setup(batch=12, seed=0):
    torch.manual_seed(seed)
    net = TransformerVelocity(
        tiny_transformer(num_layers=1, heads=2, head_dim=8, text_width=16)
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    cond = Condition(
        torch.randn(batch, 10, 16, generator=gen), torch.randn(batch, 16, generator=gen)
    )
    noise = torch.randn(batch, 3, 32, 32, generator=gen)
    return net, cond, noise, gen


def _check_against_full(net, cond, noise, sigmas, anchor):
    counted = Counting(net)
    roll = rollout(counted, noise, sigmas, cond, anchor)
    xs, vs, x0s = full_rollout(net, noise, sigmas, cond)
    k = len(sigmas) - 1
    for b, i in enumerate(anchor.tolist()):
        assert (roll.x_anchor[b] - xs[i][b]).abs().max() <= 1e-6
        assert (roll.v_anchor[b] - vs[i][b]).abs().max() <= 1e-6
        # The fake score's sample is the estimate made AT the anchor (docs/method.md).
        assert (roll.x0_anchor[b] - x0s[i][b]).abs().max() <= 1e-6
        assert roll.sigma_anchor[b] == sigmas[i]
    expected_evals = sum(min(i + 1, k) for i in anchor.tolist())
    assert roll.n_evals == counted.evals == expected_evals
    assert expected_evals == int(evals_needed(anchor, k).sum())
    return roll


def test_shrinking_rollout_matches_full_rollout_on_dynamic_schedules():
    net, cond, noise, gen = _setup()
    for _ in range(3):
        sigmas = dynamic_schedule(3, 9, 0.25, 0.95, 2.0, gen)
        anchor = draw_anchor(len(sigmas) - 1, len(noise), gen)
        _check_against_full(net, cond, noise, sigmas, anchor)


def test_shrinking_rollout_on_the_fixed_schedule_covers_every_anchor():
    net, cond, noise, _ = _setup(batch=8)
    sigmas = fixed_schedule([1.0, 0.75, 0.5, 0.25], 3.0)
    anchor = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    roll = _check_against_full(net, cond, noise, sigmas, anchor)
    assert roll.n_evals == 1 + 2 + 3 + 4 + 4 + 3 + 2 + 1 < 8 * 4


def test_rollout_saves_work_against_a_full_one():
    net, cond, noise, _ = _setup(batch=6)
    sigmas = fixed_schedule([1.0, 0.8, 0.6, 0.4, 0.2], 1.0)
    anchor = torch.zeros(6, dtype=torch.long)
    counted = Counting(net)
    rollout(counted, noise, sigmas, cond, anchor)
    assert counted.evals == 6 and counted.calls == 1  # not 6 x 5


def test_forced_steps_keep_ranks_in_step():
    """Under ZeRO-3 a rank with little to do still makes as many forward calls as asked."""
    net, cond, noise, _ = _setup(batch=4)
    sigmas = fixed_schedule([1.0, 0.8, 0.6, 0.4, 0.2], 1.0)
    counted = Counting(net)
    roll = rollout(counted, noise, sigmas, cond, torch.zeros(4, dtype=torch.long), steps=5)
    assert counted.calls == 5 and roll.n_evals == 4
