"""OPO's length-weighted baseline (docs/algorithms.md, "OPO"): worked numbers, edge cases, a loop reference,
the exact on-policy rule of its recipe, and 3-step runs on the tiny model with vLLM."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkit.algorithms import ADVANTAGES, compute_advantages
from rlkit.config import ConfigError, compose
from rlkit.validation import validate
from test_trainer_e2e import run


def mask_of(lengths, width=None):
    width = max(lengths + [1]) if width is None else width
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()


def opo(rewards, lengths, groups=None, **options):
    groups = [0] * len(rewards) if groups is None else groups
    name = options.pop("name", "opo")
    return compute_advantages(name, torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups),
                              mask_of(lengths), **options)


def per_sample(adv, lengths):
    """The scalar A_i of each row (0 for an empty response)."""
    return [adv[i, 0].item() if n else 0.0 for i, n in enumerate(lengths)]


def test_opo_worked_example():
    # b = (1*10 + 1*30) / (10+20+30+40) = 0.4; GRPO's mean baseline would be 0.5
    adv = opo([1.0, 0.0, 1.0, 0.0], [10, 20, 30, 40])
    assert per_sample(adv, [10, 20, 30, 40]) == pytest.approx([0.6, -0.4, 0.6, -0.4], abs=1e-6)
    assert adv.sum(-1).tolist() == pytest.approx([6.0, -8.0, 18.0, -16.0], abs=1e-5)  # A_i on each of its tokens
    assert adv.dtype == torch.float32


def test_opo_equal_rewards_give_exactly_zero():
    assert opo([1.0, 1.0, 1.0, 1.0], [10, 20, 30, 40]).abs().max().item() == 0.0
    assert opo([0.3, 0.1 + 0.2], [5, 7]).abs().max().item() == 0.0  # a tolerance, not float equality


def test_opo_zero_total_length_falls_back_to_the_plain_mean():
    # both references divide 0 by 0 here; rlkit uses the mean, so nothing turns NaN
    adv = opo([1.0, 0.0, 1.0, 0.0], [0, 0, 0, 0])
    assert torch.isfinite(adv).all() and adv.abs().max().item() == 0.0
    # a group with tokens next to it is unaffected: b = 0.25 there
    adv = opo([1.0, 0.0, 1.0, 0.0], [0, 0, 10, 30], groups=[0, 0, 1, 1])
    assert torch.isfinite(adv).all() and per_sample(adv, [0, 0, 10, 30])[2:] == pytest.approx([0.75, -0.25])


def test_opo_empty_response_weighs_nothing_in_the_baseline():
    # len = [0, 20, 30, 40]: b = 30 / 90
    adv = opo([1.0, 0.0, 1.0, 0.0], [0, 20, 30, 40])
    assert per_sample(adv, [0, 20, 30, 40])[1:] == pytest.approx([-1 / 3, 2 / 3, -1 / 3], abs=1e-6)


def test_opo_singleton_groups_follow_the_option():
    rewards, lengths, groups = [0.7, 1.0, 0.0], [5, 10, 30], [3, 8, 8]
    assert per_sample(opo(rewards, lengths, groups), lengths) == pytest.approx([0.0, 0.75, -0.25])
    assert per_sample(opo(rewards, lengths, groups, singleton="reward"), lengths) == pytest.approx([0.7, 0.75, -0.25])


def test_opo_unscorable_samples_are_left_out_of_the_baseline():
    scorable = torch.tensor([True, True, True, True, False, False])
    adv = opo([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], [10, 20, 30, 40, 500, 500], scorable=scorable)
    assert per_sample(adv, [10, 20, 30, 40, 1, 1]) == pytest.approx([0.6, -0.4, 0.6, -0.4, 0.0, 0.0], abs=1e-6)


def test_opo_batch_uses_one_baseline_for_the_whole_batch():
    # b = (10 + 20 + 40) / (10 + 30 + 20 + 40) = 0.7 across both groups
    lengths = [10, 30, 20, 40]
    batch = opo([1.0, 0.0, 1.0, 1.0], lengths, [0, 0, 1, 1], name="opo_batch")
    assert per_sample(batch, lengths) == pytest.approx([0.3, -0.7, 0.3, 0.3], abs=1e-6)
    grouped = opo([1.0, 0.0, 1.0, 1.0], lengths, [0, 0, 1, 1])  # per group: b = 0.25, and a flat group
    assert per_sample(grouped, lengths) == pytest.approx([0.75, -0.25, 0.0, 0.0], abs=1e-6)


def test_opo_batch_with_one_scorable_sample_is_a_singleton():
    scorable = torch.tensor([True, False])
    assert opo([1.0, 0.0], [4, 4], [0, 1], name="opo_batch", scorable=scorable).abs().max().item() == 0.0
    adv = opo([1.0, 0.0], [4, 4], [0, 1], name="opo_batch", scorable=scorable, singleton="reward")
    assert per_sample(adv, [4, 4]) == [1.0, 0.0]


def test_opo_declares_what_it_assumes():
    assert ADVANTAGES.get("opo").capabilities.needs_groups and ADVANTAGES.get("opo").capabilities.needs_on_policy
    assert ADVANTAGES.get("opo_batch").capabilities.needs_on_policy
    assert not ADVANTAGES.get("opo_batch").capabilities.needs_groups  # one baseline needs no groups


def test_opo_refuses_bad_options():
    with pytest.raises(ValueError, match="singleton"):
        opo([1.0, 0.0], [1, 1], singleton="mean")
    with pytest.raises(ValueError, match="tol"):
        opo([1.0, 0.0], [1, 1], tol=-1.0)


def loop_opo(rewards, lengths, groups, scorable, whole_batch, singleton):
    """Obviously-correct reference: one group at a time, plain Python floats."""
    keys = [0] * len(rewards) if whole_batch else groups
    out = []
    for i, key in enumerate(keys):
        members = [j for j, k in enumerate(keys) if k == key and scorable[j]]
        values = [rewards[j] for j in members]
        if not scorable[i]:
            out.append(0.0)
        elif len(members) == 1:
            out.append(rewards[i] if singleton == "reward" else 0.0)
        elif max(values) - min(values) <= 1e-6:
            out.append(0.0)
        else:
            total = sum(lengths[j] for j in members)
            base = (sum(lengths[j] * rewards[j] for j in members) / total if total
                    else sum(values) / len(values))
            out.append(rewards[i] - base)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 1.0, 0.25, 0.5]), st.integers(0, 12), st.integers(0, 3),
                          st.booleans()), min_size=1, max_size=14),
       st.booleans(), st.sampled_from(["zero", "reward"]))
def test_opo_matches_a_loop_reference(samples, whole_batch, singleton):
    rewards, lengths, groups, unscorable = map(list, zip(*samples))
    scorable = [not u for u in unscorable]
    adv = opo(rewards, lengths, groups, name="opo_batch" if whole_batch else "opo",
              scorable=torch.tensor(scorable), singleton=singleton)
    expected = loop_opo(rewards, lengths, groups, scorable, whole_batch, singleton)
    width = adv.shape[1]
    for i, n in enumerate(lengths):
        row = [expected[i] if t < n else 0.0 for t in range(width)]
        assert adv[i].tolist() == pytest.approx(row, abs=1e-6)
        assert not any(math.isnan(v) for v in adv[i].tolist())


# ---------------------------------------------------------------- the recipe and its on-policy rule
def test_opo_recipe_is_exactly_on_policy(tiny_model_dir):
    cfg = compose([f"model.path={tiny_model_dir}", "+recipe=opo"])
    validate(cfg)
    assert cfg.algorithm.advantage.name == "opo" and cfg.algorithm.loss.agg == "token-mean"
    assert (cfg.trainer.ppo_epochs, cfg.trainer.mini_batches) == (1, 1)
    assert cfg.algorithm.loss.kl_coef == 0 and cfg.algorithm.loss.entropy_coef == 0
    assert cfg.trainer.log_policy_shift and not cfg.algorithm.allow_off_policy


@pytest.mark.parametrize("override, key", [("trainer.ppo_epochs=2", "trainer.ppo_epochs"),
                                           ("trainer.mini_batches=2", "trainer.mini_batches"),
                                           ("algorithm.loss.kl_coef=0.01", "algorithm.loss.kl_coef")])
@pytest.mark.parametrize("base", [["+recipe=opo"], ["algorithm.advantage=opo_batch"]])
def test_opo_refuses_settings_that_break_exact_on_policy(tiny_model_dir, base, override, key):
    common = [f"model.path={tiny_model_dir}", *base]
    with pytest.raises(ConfigError, match=rf"^{key}: algorithm.advantage=opo(_batch)? assumes exactly on-policy"
                                          rf".*Fix: set {key}=.*allow_off_policy=true"):
        validate(compose([*common, override]))
    validate(compose([*common, override, "algorithm.allow_off_policy=true"]))


# ---------------------------------------------------------------- end to end on the tiny model with vLLM
@pytest.mark.parametrize("extra", [[], ["algorithm.token_mask=capo"]], ids=["opo", "opo+capo"])
def test_opo_recipe_runs_three_steps(tmp_path, tiny_model_dir, extra):
    metrics = run(tmp_path, tiny_model_dir, "opo", "+recipe=opo", "trainer.total_steps=3",
                  "reward.verifier=rl_tasks:contains_seven", "trainer.save_every=0", *extra)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["rollout/logprob_gap_max"] < 1e-4
        assert 0 < m["actor/policy_shift_k3"] < 1e-2  # the update moved the policy, a little (measured 2e-5..8e-5)
        assert m["actor/entropy"] > 0 and m["response/length_std"] >= 0
        assert ("capo/rejected_frac" in m) == any("capo" in e for e in extra)  # the composed mask reports
