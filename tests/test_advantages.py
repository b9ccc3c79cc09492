"""Group advantage estimators: docs/algorithms.md worked numbers, rlkit edge-case decisions, and a slow reference."""
import math

import pytest
import torch

from rlkit.algorithms import ADVANTAGES, compute_advantages
from rlkit.algorithms.advantages import grpo

R = torch.tensor([1.0, 0.0, 1.0, 0.0])
LENGTHS = [10, 20, 30, 40]


def mask_from_lengths(lengths, width=None):
    width = width if width is not None else max(lengths, default=0)
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


def one_group(n):
    return torch.zeros(n, dtype=torch.long)


def per_sample(name, rewards, group_ids, **options):
    """A_i for each sample, read from a one-token mask."""
    return compute_advantages(name, rewards, group_ids, torch.ones(len(rewards), 1), **options)[:, 0]


# ---------------------------------------------------------------- worked numbers (docs/algorithms.md, "GRPO")


def test_grpo_worked_example_uses_unbiased_std():
    adv = compute_advantages("grpo", R, one_group(4), mask_from_lengths(LENGTHS))
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # 0.866024: std_unbiased = 0.577350
    assert adv.shape == (4, 40) and adv.dtype == torch.float32
    torch.testing.assert_close(adv[:, 0], torch.tensor([a, -a, a, -a]), atol=1e-6, rtol=0)
    assert round(adv[0, 0].item(), 6) == 0.866024
    # the population std would give ±1.0: pin that the estimator does not use it
    population = (R - R.mean()) / (R.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(population, torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-5, rtol=0)
    assert (adv[:, 0] - population).abs().min() > 0.1


def test_advantage_is_copied_to_every_response_token_only():
    mask = mask_from_lengths(LENGTHS)
    adv = compute_advantages("dr_grpo", R, one_group(4), mask)
    expected = torch.tensor([0.5, -0.5, 0.5, -0.5])[:, None] * mask
    torch.testing.assert_close(adv, expected, atol=0, rtol=0)
    assert adv.sum(dim=1).tolist() == [5.0, -10.0, 15.0, -20.0]


def test_dr_grpo_worked_example():
    torch.testing.assert_close(per_sample("dr_grpo", R, one_group(4)), torch.tensor([0.5, -0.5, 0.5, -0.5]))


def test_grpo_two_samples_one_zero():
    a = per_sample("grpo", torch.tensor([1.0, 0.0]), one_group(2))
    torch.testing.assert_close(a, torch.tensor([0.7071, -0.7071]), atol=1e-4, rtol=0)


def test_bool_mask_and_other_reward_dtypes_give_float32():
    mask = mask_from_lengths(LENGTHS).bool()
    adv = compute_advantages("grpo", R.double(), one_group(4), mask)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, compute_advantages("grpo", R, one_group(4), mask.float()))


# ---------------------------------------------------------------- rlkit decisions and edge cases


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_singleton_group_zero_by_default_reward_on_request(name):
    rewards = torch.tensor([0.7, 1.0, 0.0])
    group_ids = torch.tensor([3, 8, 8])
    assert per_sample(name, rewards, group_ids)[0].item() == 0.0
    assert per_sample(name, rewards, group_ids, singleton="reward")[0].item() == pytest.approx(0.7)
    # the other group is unaffected by the option
    torch.testing.assert_close(
        per_sample(name, rewards, group_ids)[1:], per_sample(name, rewards, group_ids, singleton="reward")[1:]
    )


def test_group_left_with_one_scorable_sample_is_a_singleton():
    rewards = torch.tensor([1.0, 0.0, 0.0])
    scorable = torch.tensor([True, False, False])
    assert per_sample("grpo", rewards, one_group(3), scorable=scorable).tolist() == [0.0, 0.0, 0.0]
    a = per_sample("grpo", rewards, one_group(3), scorable=scorable, singleton="reward")
    assert a.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize(
    "rewards",
    [
        [1.0, 1.0, 1.0, 1.0],
        [0.0, 0.0, 0.0],
        [0.3, 0.1 + 0.2, 0.3],  # float noise 5.6e-17
        [0.5, 0.5 + 1e-8, 0.5 - 1e-8, 0.5],  # noise below tol=1e-6
    ],
)
def test_all_equal_group_gives_exactly_zero(name, rewards):
    a = per_sample(name, torch.tensor(rewards, dtype=torch.float64), one_group(len(rewards)))
    assert a.tolist() == [0.0] * len(rewards)


def test_noise_below_tol_is_not_turned_into_a_signal():
    rewards = torch.tensor([0.5, 0.5 + 1e-7], dtype=torch.float64)
    assert per_sample("grpo", rewards, one_group(2)).tolist() == [0.0, 0.0]
    # with the tolerance at 0 std normalisation blows the noise up to ±0.047: the tolerance is what zeroes it
    assert per_sample("grpo", rewards, one_group(2), tol=0.0).abs().min() > 0.04


def test_differences_above_tol_are_kept():
    a = per_sample("dr_grpo", torch.tensor([0.5, 0.502]), one_group(2))
    torch.testing.assert_close(a, torch.tensor([-0.001, 0.001]), atol=1e-6, rtol=0)


def test_empty_response_has_no_tokens_but_its_reward_counts():
    lengths = [0, 20, 30, 40]
    adv = compute_advantages("dr_grpo", R, one_group(4), mask_from_lengths(lengths))
    assert adv[0].abs().sum() == 0  # no tokens to act on
    # the mean stays 0.5 because the empty response's reward 1.0 is in the statistics
    torch.testing.assert_close(adv[1:, 0], torch.tensor([-0.5, 0.5, -0.5]))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_unscorable_samples_are_left_out_and_get_zero(name):
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    scorable = torch.tensor([True, True, True, True, False, False])
    a = per_sample(name, rewards, one_group(6), scorable=scorable)
    torch.testing.assert_close(a[:4], per_sample(name, R, one_group(4)))
    assert a[4:].tolist() == [0.0, 0.0]
    # treating them as reward 0 (what a broken verifier would do) changes the baseline
    assert not torch.allclose(per_sample(name, rewards, one_group(6))[:4], a[:4])


def test_group_with_no_scorable_sample_is_zero_not_nan():
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0])
    scorable = torch.tensor([False, False, True, True])
    for name in ("grpo", "dr_grpo", "rloo"):
        for singleton in ("zero", "reward"):
            a = per_sample(name, rewards, torch.tensor([1, 1, 2, 2]), scorable=scorable, singleton=singleton)
            assert torch.isfinite(a).all() and a[:2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_unsorted_non_contiguous_group_ids(name):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.4])
    dense = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    expected = per_sample(name, rewards, dense)
    perm = torch.tensor([5, 0, 3, 6, 1, 4, 2])
    sparse_ids = torch.where(dense == 0, 1_000_000_007, -42)
    got = per_sample(name, rewards[perm], sparse_ids[perm])
    torch.testing.assert_close(got, expected[perm])


def test_groups_do_not_leak_into_each_other():
    rewards = torch.tensor([1.0, 0.0, 5.0, 7.0])
    a = per_sample("dr_grpo", rewards, torch.tensor([2, 2, 9, 9]))
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, -1.0, 1.0]))


def test_rloo_hand_numbers():
    torch.testing.assert_close(
        per_sample("rloo", R, one_group(4)), torch.tensor([2 / 3, -2 / 3, 2 / 3, -2 / 3])
    )
    # r=[1,0,0]: baselines 0, 0.5, 0.5
    torch.testing.assert_close(
        per_sample("rloo", torch.tensor([1.0, 0.0, 0.0]), one_group(3)), torch.tensor([1.0, -0.5, -0.5])
    )
    # two samples: each baseline is the other reward
    torch.testing.assert_close(per_sample("rloo", torch.tensor([0.25, 1.0]), one_group(2)), torch.tensor([-0.75, 0.75]))


def test_empty_batch():
    adv = compute_advantages("grpo", torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 5))
    assert adv.shape == (0, 5)


# ---------------------------------------------------------------- option and input errors


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_bad_singleton_names_option_and_choices(name):
    with pytest.raises(ValueError, match=r"singleton.*'zero', 'reward'.*'mean'"):
        per_sample(name, R, one_group(4), singleton="mean")


@pytest.mark.parametrize(
    "name, option", [("grpo", "baseline"), ("dr_grpo", "eps"), ("dr_grpo", "norm_by_std"), ("rloo", "eps")]
)
def test_unknown_options_are_refused_not_ignored(name, option):
    with pytest.raises(TypeError, match=option):
        per_sample(name, R, one_group(4), **{option: 1})


def test_input_errors_name_the_argument():
    with pytest.raises(ValueError, match="response_mask"):
        compute_advantages("grpo", R, one_group(4), torch.ones(3, 2))
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages("grpo", R, one_group(3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="group_ids must be an integer"):
        compute_advantages("grpo", R, torch.zeros(4), torch.ones(4, 2))
    with pytest.raises(ValueError, match="scorable"):
        compute_advantages("grpo", R, one_group(4), torch.ones(4, 2), scorable=torch.ones(4))
    with pytest.raises(ValueError, match="finite"):
        compute_advantages("grpo", torch.tensor([1.0, float("nan")]), one_group(2), torch.ones(2, 2))


# ---------------------------------------------------------------- registry


def test_registry_refuses_a_different_function_under_a_known_name():
    with pytest.raises(ValueError, match="grpo"):
        ADVANTAGES.register("grpo")(lambda *a, **k: None)
    assert ADVANTAGES.get("grpo") is grpo
    ADVANTAGES.register("grpo")(grpo)  # the same function again is fine


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(KeyError) as err:
        compute_advantages("ppo_gae", R, one_group(4), torch.ones(4, 1))
    for name in ("grpo", "dr_grpo", "rloo"):
        assert name in str(err.value)


def test_estimator_by_import_path():
    got = compute_advantages("rlkit.algorithms.advantages:rloo", R, one_group(4), torch.ones(4, 1))
    torch.testing.assert_close(got, compute_advantages("rloo", R, one_group(4), torch.ones(4, 1)))


# ---------------------------------------------------------------- property test against a slow loop


def slow_reference(name, rewards, group_ids, scorable, singleton, eps=1e-6, tol=1e-6):
    """Obviously-correct per-group loop over python floats."""
    out = [0.0] * len(rewards)
    for g in set(group_ids):
        members = [i for i in range(len(rewards)) if group_ids[i] == g and scorable[i]]
        values = [rewards[i] for i in members]
        n = len(values)
        for i in members:
            if n == 1:
                out[i] = rewards[i] if singleton == "reward" else 0.0
            elif max(values) - min(values) <= tol:
                out[i] = 0.0
            elif name == "rloo":
                out[i] = rewards[i] - (sum(values) - rewards[i]) / (n - 1)
            else:
                mean = sum(values) / n
                out[i] = rewards[i] - mean
                if name == "grpo":
                    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
                    out[i] /= std + eps
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_matches_slow_reference_on_random_batches(name, seed):
    gen = torch.Generator().manual_seed(seed)
    n_groups = int(torch.randint(1, 9, (1,), generator=gen))
    id_pool = torch.randint(-10**6, 10**6, (n_groups,), generator=gen)
    batch = int(torch.randint(1, 40, (1,), generator=gen))
    group_ids = id_pool[torch.randint(0, n_groups, (batch,), generator=gen)]
    if seed % 2:
        rewards = torch.randint(0, 2, (batch,), generator=gen).float()  # binary: many all-equal groups
    else:
        rewards = torch.rand(batch, generator=gen) * 4 - 2
    scorable = torch.rand(batch, generator=gen) > 0.2
    lengths = torch.randint(0, 6, (batch,), generator=gen)
    mask = mask_from_lengths(lengths.tolist(), width=6)
    for singleton in ("zero", "reward"):
        adv = compute_advantages(name, rewards, group_ids, mask, scorable=scorable, singleton=singleton)
        expected = slow_reference(
            name, rewards.tolist(), group_ids.tolist(), scorable.tolist(), singleton
        )
        expected = torch.tensor(expected, dtype=torch.float32)[:, None] * mask
        torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
