"""GRPO-λ's length reward (docs/algorithms.md, "GRPO-λ"): worked numbers, edge cases, a loop reference,
its step metrics, the recipe, and 3-step runs on the tiny model with vLLM."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkit.algorithms import SHAPERS, compute_advantages, shape_rewards
from rlkit.algorithms.grpo_lambda import grpo_lambda_rewards
from rlkit.config import ConfigError, compose
from rlkit.validation import validate
from rlkit.registry import PluginSpec
from test_trainer_e2e import run


def batch(correct, lengths, groups, scorable=None):
    correct = torch.tensor(correct, dtype=torch.bool)
    out = (correct.float(), correct, torch.tensor(lengths), torch.tensor(groups))
    return out if scorable is None else (*out, torch.tensor(scorable, dtype=torch.bool))


def shaped(correct, lengths, groups, scorable=None, **options):
    rewards, correct, lengths, groups, *rest = batch(correct, lengths, groups, scorable)
    return shape_rewards("grpo_lambda", rewards, correct, lengths, groups, scorable=rest[0] if rest else None,
                         **options).tolist()


# ALGORITHMS worked example: q1..q5 with G=4, lam=0.4, alpha=0.2
EXAMPLE = batch(
    [1, 1, 1, 0] + [1, 0, 0, 0] + [1, 1, 0, 0] + [0, 0, 0, 0] + [1, 1, 1, 1],
    [100, 200, 300, 50] + [10, 20, 30, 40] + [10, 20, 30, 40] + [10, 20, 30, 40] + [100, 200, 300, 400],
    [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4,
)


def test_worked_example_rewards_and_grpo_advantages():
    # p = [0.75, 0.25, 0.5, 0, 1]; ceil(0.4 * 5) = 2 groups: q5 and q1 get the length reward
    rewards = shape_rewards("grpo_lambda", *EXAMPLE, lam=0.4, alpha=0.2)
    assert rewards[:4].tolist() == pytest.approx([0.954579, 0.9, 0.845421, 0.0], abs=1e-6)  # q1: mu 200, s 81.65
    assert rewards[16:].tolist() == pytest.approx([0.958552, 0.921995, 0.878005, 0.841448], abs=1e-6)  # q5
    assert rewards[4:16].tolist() == EXAMPLE[0][4:16].tolist()  # q2, q3, q4 keep 0/1
    adv = compute_advantages("grpo", rewards, EXAMPLE[3], torch.ones(20, 1))[:, 0]
    assert adv[:4].tolist() == pytest.approx([0.618262, 0.497565, 0.376868, -1.492695], abs=1e-5)
    assert adv[16:].tolist() == pytest.approx([1.146495, 0.430686, -0.430686, -1.146495], abs=1e-5)
    assert adv[8:12].tolist() == pytest.approx([0.866024, 0.866024, -0.866024, -0.866024], abs=1e-5)  # q3


def test_alpha_cancels_under_std_normalisation_except_in_mixed_groups():
    """Default alpha 0.6 (the write-up's code). All-correct q5: r = 1 - 0.6 sigma(z) = [0.875656, 0.765986, 0.634014,
    0.524344], GRPO A the same as at alpha 0.2 (up to eps); q2 (one correct): 0.7 against 0, A = [1.5, -0.5 x3] at any
    alpha. Mixed q1: r = [0.863738, 0.7, 0.536262, 0], A = [0.904109, 0.467083, 0.030058, -1.40125] (0.2: [0.618262, ...])."""
    rewards = shape_rewards("grpo_lambda", *EXAMPLE, lam=0.4)
    assert rewards[16:].tolist() == pytest.approx([0.875656, 0.765986, 0.634014, 0.524344], abs=1e-6)
    assert rewards[:4].tolist() == pytest.approx([0.863738, 0.7, 0.536262, 0.0], abs=1e-6)
    adv = {alpha: compute_advantages("grpo", shape_rewards("grpo_lambda", *EXAMPLE, lam=1.0, alpha=alpha), EXAMPLE[3],
                                     torch.ones(20, 1))[:, 0] for alpha in (0.2, 0.6)}
    assert adv[0.6][16:].tolist() == pytest.approx([1.14651, 0.430692, -0.430692, -1.14651], abs=1e-5)
    assert adv[0.6][16:].tolist() == pytest.approx(adv[0.2][16:].tolist(), abs=1e-4)  # q5: only eps differs
    assert adv[0.6][4:8].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5) == adv[0.2][4:8].tolist()
    assert adv[0.6][:4].tolist() == pytest.approx([0.904109, 0.467083, 0.030058, -1.40125], abs=1e-5)
    assert adv[0.2][:4].tolist() == pytest.approx([0.618262, 0.497565, 0.376868, -1.492695], abs=1e-5)


def test_step_metrics_report_the_branch_the_accuracy_and_the_correct_length():
    shaper = SHAPERS.build(PluginSpec("grpo_lambda", {"lam": 0.4}))
    assert shaper.step_metrics() == {}  # nothing shaped yet
    shaper(*EXAMPLE)
    correct_lengths = [100, 200, 300, 10, 10, 20, 100, 200, 300, 400]
    assert shaper.step_metrics() == pytest.approx({
        "grpo_lambda/efficient_group_frac": 2 / 5, "grpo_lambda/accuracy": 10 / 20,
        "grpo_lambda/correct_length_mean": sum(correct_lengths) / 10})
    assert shaper.step_metrics() == {}  # reset once read
    shaper(*batch([0, 0], [5, 6], [0, 0]))
    assert "grpo_lambda/correct_length_mean" not in shaper.step_metrics()  # no correct response: no mean


def test_one_correct_response_or_equal_lengths_get_one_minus_half_alpha():
    assert shaped([1, 0, 0], [7, 3, 9], [0, 0, 0], lam=1.0, alpha=0.2) == pytest.approx([0.9, 0.0, 0.0])
    assert shaped([1, 1, 0], [5, 5, 9], [0, 0, 0], lam=1.0, alpha=0.3) == pytest.approx([0.85, 0.85, 0.0])  # s = 0


def test_top_groups_without_a_correct_response_get_zero_and_no_signal():
    rewards = torch.tensor(shaped([0, 0, 0, 0], [5, 6, 7, 8], [0, 0, 1, 1], lam=0.5))
    assert rewards.tolist() == [0.0] * 4
    assert compute_advantages("grpo", rewards, torch.tensor([0, 0, 1, 1]), torch.ones(4, 1)).abs().max() == 0


def test_all_correct_group_becomes_a_pure_length_signal():
    rewards = torch.tensor(shaped([1, 1, 1, 1], [10, 20, 30, 40], [0] * 4))
    assert rewards.tolist() == sorted(rewards.tolist(), reverse=True) and rewards.max() < 1.0
    adv = compute_advantages("grpo", rewards, torch.zeros(4, dtype=torch.long), torch.ones(4, 1))[:, 0]
    assert adv[0] > 0 > adv[3]  # the shortest correct answer is pushed up, the longest down


def test_at_least_one_group_and_no_float_noise_in_the_count():
    groups = [g for g in range(10) for _ in range(2)]
    correct = [1, 0] * 10
    for lam, expected in [(0.01, 1), (0.7, 7), (0.3, 3), (0.2, 2), (1.0, 10), (0.71, 8)]:
        out = grpo_lambda_rewards(*batch(correct, [4] * 20, groups), lam=lam)
        assert int(out.efficient.sum()) == 2 * expected, lam  # 0.7 * 10 = 7.000000000000001 is still 7 groups


def test_ties_are_broken_by_ascending_group_id_whatever_the_row_order():
    # groups 9, 4, 6 all half right: lam 0.34 -> ceil(1.02) = 2 groups, the ids 4 and 6
    correct, lengths, groups = [1, 0, 1, 0, 1, 0], [3, 4, 5, 6, 7, 8], [9, 9, 4, 4, 6, 6]
    out = grpo_lambda_rewards(*batch(correct, lengths, groups), lam=0.34)
    assert out.efficient.tolist() == [False, False, True, True, True, True]
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    permuted = grpo_lambda_rewards(*[t[perm] for t in batch(correct, lengths, groups)], lam=0.34)
    assert torch.equal(permuted.rewards, out.rewards[perm]) and torch.equal(permuted.efficient, out.efficient[perm])


def test_unscorable_samples_are_not_counted_as_wrong_and_keep_their_reward():
    # group 0: 2 of 2 scorable right (ratio 1, not 0.5); group 1: 3 of 4 right. lam picks one group: group 0.
    correct = [1, 1, 0, 0] + [1, 1, 1, 0]
    scorable = [True, True, False, False] + [True] * 4
    rewards, correct_t, lengths, groups, scorable_t = batch(correct, [10, 30, 999, 999, 1, 2, 3, 4], [0] * 4 + [1] * 4,
                                                            scorable)
    rewards = rewards.clone()
    rewards[2:4] = 0.5  # whatever the verifier left there
    out = grpo_lambda_rewards(rewards, correct_t, lengths, groups, scorable=scorable_t, lam=0.5, alpha=0.2)
    assert out.efficient.tolist() == [True] * 4 + [False] * 4
    # mu, s over the two scorable lengths 10, 30 only: z = -1, +1
    assert out.rewards[:2].tolist() == pytest.approx([1 - 0.2 / (1 + math.e), 1 - 0.2 / (1 + math.exp(-1))])
    assert out.rewards[2:].tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 0.0]


def test_group_without_a_scorable_sample_is_not_ranked():
    rewards, correct, lengths, groups, scorable = batch([1, 1, 1, 0], [5, 6, 7, 8], [0, 0, 1, 1],
                                                        [False, False, True, True])
    out = grpo_lambda_rewards(rewards, correct, lengths, groups, scorable=scorable, lam=0.5, alpha=0.2)
    assert out.efficient.tolist() == [False, False, True, True]  # group 0 would rank first (ratio 1) if it counted
    assert out.rewards.tolist() == pytest.approx([1.0, 1.0, 0.9, 0.0])
    shaper = SHAPERS.build(PluginSpec("grpo_lambda", {"lam": 0.5}))
    shaper(rewards, correct, lengths, groups, scorable=scorable)
    assert shaper.step_metrics()["grpo_lambda/efficient_group_frac"] == 1.0  # 1 of the 1 ranked group


def test_input_untouched_and_float32_out():
    rewards, correct, lengths, groups = EXAMPLE
    before = rewards.clone()
    out = shape_rewards("grpo_lambda", rewards, correct, lengths, groups)
    assert torch.equal(rewards, before) and out.dtype == torch.float32


def test_bad_options_are_refused():
    for options, word in [({"lam": 0.0}, "lam"), ({"lam": 1.5}, "lam"), ({"alpha": -0.1}, "alpha")]:
        with pytest.raises(ValueError, match=rf"grpo_lambda {word}: .*Fix:"):
            SHAPERS.build(PluginSpec("grpo_lambda", options))
    assert SHAPERS.get("grpo_lambda").capabilities.needs_groups


def loop_grpo_lambda(rewards, correct, lengths, groups, scorable, lam, alpha):
    """Obviously-correct reference: plain Python over groups in ascending id."""
    ids = sorted(set(groups))
    ratio = {}
    for g in ids:
        members = [i for i in range(len(groups)) if groups[i] == g and scorable[i]]
        if members:
            ratio[g] = sum(correct[i] for i in members) / len(members)
    ranked = sorted(ratio, key=lambda g: -ratio[g])  # Python's sort is stable
    top = set(ranked[:max(1, math.ceil(round(lam * len(ranked), 9)))]) if ranked else set()
    out = list(rewards)
    for i, g in enumerate(groups):
        if g not in top or not scorable[i]:
            continue
        if not correct[i]:
            out[i] = 0.0
            continue
        right = [lengths[j] for j in range(len(groups)) if groups[j] == g and scorable[j] and correct[j]]
        mean = sum(right) / len(right)
        std = math.sqrt(sum((x - mean) ** 2 for x in right) / len(right))
        z = (lengths[i] - mean) / std if std > 0 else 0.0
        out[i] = 1.0 - alpha / (1.0 + math.exp(-z))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50), st.integers(0, 6), st.booleans()), min_size=1, max_size=24),
       st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.7, 1.0]), st.sampled_from([0.0, 0.2, 0.5]))
def test_matches_a_loop_reference(samples, lam, alpha):
    correct, lengths, groups, unscorable = map(list, zip(*samples))
    scorable = [not u for u in unscorable]
    rewards = [0.25 if not s else float(c) for c, s in zip(correct, scorable)]
    out = grpo_lambda_rewards(torch.tensor(rewards), torch.tensor(correct), torch.tensor(lengths), torch.tensor(groups),
                              scorable=torch.tensor(scorable), lam=lam, alpha=alpha)
    expected = loop_grpo_lambda(rewards, correct, lengths, groups, scorable, lam, alpha)
    assert out.rewards.tolist() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- recipe and end to end
def test_recipe_validates_and_refuses_unknown_options(tiny_model_dir):
    base = [f"model.path={tiny_model_dir}", "+recipe=grpo_lambda"]
    cfg = compose(base)
    validate(cfg)
    assert cfg.algorithm.reward_shaper.name == "grpo_lambda" and cfg.algorithm.advantage.name == "grpo"
    assert (cfg.algorithm.reward_shaper.options.lam, cfg.algorithm.reward_shaper.options.alpha) == (0.2, 0.6)
    with pytest.raises(ConfigError, match=r"algorithm.reward_shaper.options.beta: .*takes no option"):
        validate(compose([*base, "+algorithm.reward_shaper.options.beta=1"]))
    with pytest.raises(ConfigError, match=r"rollout.n: .*grpo_lambda"):
        validate(compose([*base, "rollout.n=1"]))


@pytest.mark.parametrize("extra", [[], ["algorithm.token_mask=capo"]], ids=["grpo_lambda", "grpo_lambda+capo"])
def test_grpo_lambda_recipe_runs_three_steps(tmp_path, tiny_model_dir, extra):
    metrics = run(tmp_path, tiny_model_dir, "glam", "+recipe=grpo_lambda", "trainer.total_steps=3",
                  "reward.verifier=rl_tasks:contains_seven", "trainer.save_every=0", *extra)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["rollout/logprob_gap_max"] < 1e-4
        assert m["grpo_lambda/efficient_group_frac"] == 0.25  # ceil(0.2 * 4 groups) = 1 of 4
        assert 0 <= m["grpo_lambda/accuracy"] <= 1
        assert ("capo/rejected_frac" in m) == any("capo" in e for e in extra)  # the composed mask reports
        assert "actor/policy_shift_k3" not in m  # trainer.log_policy_shift is off by default
