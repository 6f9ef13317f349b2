"""Advantages, DAPO dynamic sampling and the overlong penalty, against hand-computed values."""

import pytest
import torch

from stacklab.rl.advantages import group_advantages, informative_groups, overlong_penalty

# Three groups of four answers: mixed, all equal (no signal), one winner.
REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])


def test_no_scale_is_reward_minus_group_mean():
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [1.5, -0.5, -0.5, -0.5]])
    torch.testing.assert_close(group_advantages(REWARDS, "none"), expected)


def test_group_std_divides_by_unbiased_group_std():
    # row 0: squared deviations sum to 1, std = sqrt(1/3) = 0.577350; row 2: sum 3, std = 1.
    a = 0.5 / 0.5773503
    expected = torch.tensor([[a, -a, -a, a], [0.0, 0.0, 0.0, 0.0], [1.5, -0.5, -0.5, -0.5]])
    torch.testing.assert_close(group_advantages(REWARDS, "group_std"), expected, atol=1e-5, rtol=0)


def test_batch_std_divides_by_unbiased_std_of_all_rewards():
    # all 12 rewards: mean 2/3, squared deviations sum to 42/9, std = sqrt(42/9/11) = 0.651339
    s = 0.6513389
    expected = (
        torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [1.5, -0.5, -0.5, -0.5]]) / s
    )
    torch.testing.assert_close(group_advantages(REWARDS, "batch_std"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", ["none", "group_std", "batch_std"])
def test_zero_variance_gives_zeros_not_nan(scale):
    adv = group_advantages(torch.full((2, 3), 0.7), scale)
    assert torch.equal(adv, torch.zeros(2, 3))


def test_rejects_groups_of_one_and_unknown_scale():
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1), "group_std")
    with pytest.raises(ValueError):
        group_advantages(REWARDS, "rank")


def test_informative_groups_are_those_with_unequal_rewards():
    assert informative_groups(REWARDS).tolist() == [True, False, True]
    assert not informative_groups(torch.zeros(4, 2)).any()


def test_overlong_penalty_values():
    # soft limit 10 - 4 = 6; linear to -0.5 at 10; -0.5 beyond.
    lengths = torch.tensor([3, 6, 7, 9, 10, 12])
    got = overlong_penalty(lengths, max_len=10, cache_len=4, penalty=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.125, -0.375, -0.5, -0.5]))


def test_overlong_penalty_rejects_bad_cache():
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), max_len=10, cache_len=0)
    with pytest.raises(ValueError):
        overlong_penalty(torch.tensor([1]), max_len=10, cache_len=11)
