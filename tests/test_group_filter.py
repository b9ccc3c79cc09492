"""zero_variance_groups (DAPO dynamic sampling): hand cases, tolerance, unscorable samples, slow reference."""
import pytest
import torch

from rlkit.algorithms import zero_variance_groups


def test_hand_example_with_sparse_unsorted_ids():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 1.0, 0.0, 0.3])
    group_ids = torch.tensor([70, -4, 70, 70, 9, -4, 123456789, 9])
    #   70: {1,1,1} equal -> True; -4: {0,1} mixed -> False; 123456789: singleton -> True; 9: {0.5,0.3} -> False
    expected = [True, False, True, True, False, False, True, False]
    assert zero_variance_groups(rewards, group_ids).tolist() == expected


def test_tolerance_not_exact_equality():
    rewards = torch.tensor([0.3, 0.1 + 0.2, 0.5, 0.5 + 1e-7, 0.5, 0.5 + 1e-3], dtype=torch.float64)
    group_ids = torch.tensor([0, 0, 1, 1, 2, 2])
    assert zero_variance_groups(rewards, group_ids).tolist() == [True, True, True, True, False, False]
    # exact comparison would keep the float-noise groups
    assert zero_variance_groups(rewards, group_ids, tol=0.0).tolist() == [False, False, False, False, False, False]
    assert zero_variance_groups(rewards, group_ids, tol=1e-2).tolist() == [True] * 6
    # the bound is inclusive: max - min == tol is zero variance
    assert zero_variance_groups(torch.tensor([0.0, 0.5]), torch.tensor([4, 4]), tol=0.5).tolist() == [True, True]


def test_unscorable_samples_are_left_out_of_the_range():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    group_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    scorable = torch.tensor([True, True, False, True, False, True])
    # group 0: scorable {1,1} -> zero variance (the unscorable 0.0 is not a real reward); group 1: {1,0} mixed
    assert zero_variance_groups(rewards, group_ids, scorable).tolist() == [True, True, True, False, False, False]
    assert zero_variance_groups(rewards, group_ids).tolist() == [False] * 6


def test_groups_with_fewer_than_two_scorable_samples_count_as_zero_variance():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    group_ids = torch.tensor([0, 0, 1, 1])
    scorable = torch.tensor([True, False, False, False])
    assert zero_variance_groups(rewards, group_ids, scorable).tolist() == [True] * 4


def test_input_errors():
    with pytest.raises(ValueError, match="tol"):
        zero_variance_groups(torch.zeros(2), torch.zeros(2, dtype=torch.long), tol=-1.0)
    with pytest.raises(ValueError, match="scorable"):
        zero_variance_groups(torch.zeros(2), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids"):
        zero_variance_groups(torch.zeros(2), torch.zeros(3, dtype=torch.long))


def slow_zero_variance(rewards, group_ids, scorable, tol):
    out = []
    for g in group_ids:
        values = [r for r, h, s in zip(rewards, group_ids, scorable) if h == g and s]
        out.append(len(values) < 2 or max(values) - min(values) <= tol)
    return out


@pytest.mark.parametrize("seed", range(8))
def test_matches_slow_reference_on_random_batches(seed):
    gen = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 50, (1,), generator=gen))
    id_pool = torch.randint(-1000, 1000, (int(torch.randint(1, 10, (1,), generator=gen)),), generator=gen)
    group_ids = id_pool[torch.randint(0, len(id_pool), (batch,), generator=gen)]
    rewards = torch.randint(0, 3, (batch,), generator=gen).double() / 2
    rewards = rewards + (torch.rand(batch, generator=gen, dtype=torch.float64) - 0.5) * 4e-6  # noise near tol
    scorable = torch.rand(batch, generator=gen) > 0.25
    for tol in (0.0, 1e-6, 0.6):
        got = zero_variance_groups(rewards, group_ids, scorable, tol=tol)
        assert got.dtype == torch.bool
        assert got.tolist() == slow_zero_variance(rewards.tolist(), group_ids.tolist(), scorable.tolist(), tol)
