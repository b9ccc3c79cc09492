"""FR3E: the estimator's worked numbers and edge cases, a slow-loop property test, the sampler's states on a fake
engine (CPU, no vLLM), and the recipe end to end on the tiny model."""
import dataclasses
import math
import random
from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlkit.algorithms import SHAPERS, compute_advantages
from rlkit.algorithms.fr3e import sharpen_deltas
from rlkit.rollout.base import Completion, SamplingConfig
from rlkit.sampling import SAMPLERS, SamplerContext
from rlkit.sampling.fr3e import FR3ESampler, branch_points, keep_bases, paragraph_cuts, state_prompts
from rlkit.registry import PluginSpec
from test_trainer_e2e import run

# ALGORITHMS worked example (K=2, M=4): states S_0, S_1, S_2 of one base trajectory.
WORKED = [1.0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0]


def fr3e(rewards, states, bases=None, scorable=None, **options):
    rewards = torch.tensor(rewards, dtype=torch.float32)
    states = torch.tensor(states, dtype=torch.long)
    bases = torch.zeros_like(states) if bases is None else torch.tensor(bases, dtype=torch.long)
    groups = bases * 100 + states
    scorable = None if scorable is None else torch.tensor(scorable)
    out = compute_advantages("fr3e", rewards, groups, torch.ones(len(rewards), 3), base_ids=bases,
                             state_index=states, scorable=scorable, **options)
    assert torch.equal(out[:, 0], out[:, 2])
    return out[:, 0]


def test_fr3e_worked_example_without_sharpening():
    got = fr3e(WORKED, [0] * 4 + [1] * 4 + [2] * 4, sharpen=None)
    # V = [0.25, 0.5, 0.75], δ = [0.75, 0.25, 0.25], exp(δ) = [2.117000, 1.284025, 1.284025]
    want = [0.354275, -0.118092, -0.118092, -0.118092, 0.389400, 0.389400, -0.389400, -0.389400,
            0.194700, 0.194700, 0.194700, -0.584101]
    torch.testing.assert_close(got, torch.tensor(want), atol=2e-6, rtol=0)


def test_fr3e_worked_example_with_sharpening():
    got = fr3e(WORKED, [0] * 4 + [1] * 4 + [2] * 4)  # sharpen=1.5 by default: δ' = [0.722074, 0.138963, 0.138963]
    want = [0.364308, -0.121436, -0.121436, -0.121436, 0.435130, 0.435130, -0.435130, -0.435130,
            0.217565, 0.217565, 0.217565, -0.652695]
    torch.testing.assert_close(got, torch.tensor(want), atol=2e-6, rtol=0)


def test_zero_sum_of_powered_deltas_gives_zero_not_nan():
    # Σ|δ|^α = 0: every δ is 0, δ' = 0 and the coefficient is 1 (the released code divides 0 by 0 here).
    zeros = torch.zeros(3, dtype=torch.float64)
    assert sharpen_deltas(zeros, torch.zeros(3, dtype=torch.long), 1.5).tolist() == [0, 0, 0]
    # V(S_0) = 1 and V(S_1) = 1 with rewards that still differ: δ = [0, 0], A unmodulated.
    got = fr3e([1.5, 0.5, 2.0, 0.0], [0, 0, 1, 1])
    assert got.tolist() == [0.5, -0.5, 1.0, -1.0]


def test_dropped_state_is_skipped_in_the_value_chain():
    # S_1 dropped: δ_2 = V(S_2) − V(S_0) = 0.75 − 0.25 = 0.5.
    got = fr3e(WORKED[:4] + WORKED[8:], [0] * 4 + [2] * 4, sharpen=None)
    torch.testing.assert_close(got[4:], torch.tensor([0.25, 0.25, 0.25, -0.75]) / math.exp(0.5))
    # S_0 dropped as well: the first surviving state gets δ = 1 − V = 0.25.
    alone = fr3e(WORKED[8:], [2] * 4, sharpen=None)
    torch.testing.assert_close(alone, torch.tensor([0.25, 0.25, 0.25, -0.75]) / math.exp(0.25))


def test_unscorable_samples_stay_out_of_values_and_means():
    # S_0's fifth sample is unscorable: V(S_0) and its mean come from [1, 0, 0, 0] alone, its advantage is 0.
    rewards = WORKED[:4] + [1.0] + WORKED[4:]
    states = [0] * 5 + [1] * 4 + [2] * 4
    scorable = [True] * 4 + [False] + [True] * 8
    got = fr3e(rewards, states, scorable=scorable)
    reference = fr3e(WORKED, [0] * 4 + [1] * 4 + [2] * 4)
    assert got[4] == 0
    torch.testing.assert_close(torch.cat([got[:4], got[5:]]), reference)


def test_bases_are_modulated_independently():
    one = fr3e(WORKED, [0] * 4 + [1] * 4 + [2] * 4)
    two = fr3e(WORKED + [0, 1, 1, 1], [0] * 4 + [1] * 4 + [2] * 4 + [0] * 4, bases=[7] * 12 + [3] * 4)
    torch.testing.assert_close(two[:12], one)
    torch.testing.assert_close(two[12:], torch.tensor([-0.75, 0.25, 0.25, 0.25]) / math.exp(1.0))  # δ' = 1 alone


def test_group_ids_must_match_base_and_state():
    rewards, mask = torch.tensor([1.0, 0, 1, 0]), torch.ones(4, 2)
    states = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"group_ids: must be one group per \(base_ids, state_index\) pair. Fix"):
        compute_advantages("fr3e", rewards, torch.zeros(4, dtype=torch.long), mask,
                           base_ids=torch.zeros(4, dtype=torch.long), state_index=states)


def test_estimator_without_branch_keys_names_the_sampler():
    with pytest.raises(ValueError, match=r"base_ids/state_index: .* Fix: set algorithm.sampler=fr3e"):
        compute_advantages("fr3e", torch.tensor([1.0, 0.0]), torch.zeros(2, dtype=torch.long), torch.ones(2, 2))


def slow_fr3e(rewards, bases, states, scorable, sharpen, tol=1e-6):
    """The estimator as plain loops over dicts: obviously correct, slow."""
    members = defaultdict(list)
    for i, key in enumerate(zip(bases, states)):
        members[key].append(i)
    values = {key: sum(rewards[i] for i in idx if scorable[i]) / sum(scorable[i] for i in idx)
              for key, idx in members.items() if any(scorable[i] for i in idx)}
    coefficient = {}
    for base in set(bases):
        chain = sorted(j for b, j in values if b == base)
        if not chain:  # no scorable sample in any state of this base
            continue
        deltas = [1 - values[base, chain[0]]] + [values[base, j] - values[base, p] for p, j in zip(chain, chain[1:])]
        if sharpen is not None:
            total = sum(abs(d) ** sharpen for d in deltas)
            deltas = [math.copysign(abs(d) ** sharpen / total, d) if total > 0 else 0.0 for d in deltas]
        coefficient.update({(base, j): math.exp(d) for j, d in zip(chain, deltas)})
    advantages = [0.0] * len(rewards)
    for key, idx in members.items():
        scored = [rewards[i] for i in idx if scorable[i]]
        if len(scored) < 2 or max(scored) - min(scored) <= tol:
            continue
        mean = sum(scored) / len(scored)
        for i in idx:
            if scorable[i]:
                advantages[i] = (rewards[i] - mean) / coefficient[key]
    return advantages


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_estimator_matches_slow_loop_whatever_the_batch_order(data):
    samples = []
    for base in data.draw(st.lists(st.integers(0, 50), min_size=1, max_size=4, unique=True)):
        for state in data.draw(st.lists(st.integers(0, 4), min_size=1, max_size=4, unique=True)):
            for _ in range(data.draw(st.integers(1, 4))):
                reward = data.draw(st.sampled_from([0.0, 1.0, 0.5, 0.25]))
                samples.append((base, state, reward, data.draw(st.booleans()) or data.draw(st.booleans())))
    random.Random(data.draw(st.integers(0, 10**6))).shuffle(samples)
    sharpen = data.draw(st.sampled_from([None, 1.5, 1.0, 2.0]))
    bases, states, rewards, scorable = (list(column) for column in zip(*samples))
    got = fr3e(rewards, states, bases=bases, scorable=scorable, sharpen=sharpen)
    want = slow_fr3e(rewards, bases, states, scorable, sharpen)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- sampler on a fake engine
def test_branch_points_top_k_ascending_one_cut_when_short():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.5], [0.3, 0.7, 0.0, 0.0, 0.0], [0.0] * 5])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert branch_points(scores, mask, 2) == [[1, 3], [1], []]  # length 2 is not longer than K=2: one cut
    assert branch_points(scores, mask, 1) == [[1], [1], []]


def test_keep_bases_caps_right_and_wrong_per_prompt():
    prompt = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    correct = torch.tensor([True, True, False, False, False, False, True])
    scorable = torch.tensor([True, True, False, True, True, True, True])
    assert keep_bases(prompt, correct, scorable, 1, 1) == [0, 3, 4, 6]  # row 2 unscorable, never kept
    assert keep_bases(prompt, correct, scorable, 2, 0) == [0, 1, 6]


def test_state_prompts_concatenate_token_ids():
    assert state_prompts([5, 6], [1, 2, 3, 4], [1, 3]) == [[5, 6], [5, 6, 1], [5, 6, 1, 2, 3]]


class FakeEngine:
    """Deterministic completions from (prompt, seed, sample): digits 0-9 with random logprobs; records calls."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, sampling):
        completions = []
        for p, prompt in enumerate(prompts):
            for k in range(sampling.n):
                rng = random.Random(f"{prompt}-{sampling.seed}-{k}")
                ids = [rng.randrange(10) for _ in range(rng.randrange(1, 7))]
                completions.append(Completion(p, ids, [-rng.random() * 3 for _ in ids], "stop"))
        self.calls.append((prompts, sampling, completions))
        return completions


class FakeTokenizer:
    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in ids]


def seven_anywhere(batch):
    """Verifier: reward 1 when the whole response contains the token 7."""
    batch.correct = torch.tensor(["7" in text.split() for text in batch.texts])
    batch.rewards = batch.correct.float()
    batch.scorable = torch.ones(len(batch), dtype=torch.bool)
    batch.extracted = list(batch.texts)


def fake_context(engine, n=4, seed=3, token_stats=None):
    return SamplerContext(engine=engine, tokenizer=FakeTokenizer(), sampling=SamplingConfig(n=n, seed=seed),
                          build_prompt=lambda row: [100 + int(row["question"])], score=seven_anywhere, pad_id=0,
                          token_stats=token_stats)


ROWS = [{"question": str(q), "answer": "7", "meta": {}} for q in range(5)]


def test_branch_state_prompt_ids_are_base_prompt_and_response_prefix_exactly():
    engine = FakeEngine()
    sampler = FR3ESampler(base_n=4, k=2, branch_score="surprisal", max_state_rounds=1)
    batch = sampler(ROWS, fake_context(engine), first_group_id=10)
    (base_prompts, base_sampling, base), (state_prompts_sent, sampling, _) = engine.calls
    assert base_sampling.n == 4 and sampling.n == 4 and len(engine.calls) == 2  # one batched explore call
    assert sampling.seed != base_sampling.seed  # S_0's continuations are fresh, not the base responses again
    expected = []
    correct = torch.tensor([7 in c.token_ids for c in base])
    for row in keep_bases(torch.tensor([c.prompt_index for c in base]), correct, torch.ones_like(correct), 1, 1):
        c = base[row]
        take = 2 if len(c.token_ids) > 2 else 1
        cuts = sorted(sorted(range(len(c.token_ids)), key=lambda t: c.logprobs[t])[:take])  # lowest logprobs
        prompt = base_prompts[c.prompt_index]
        expected += [prompt] + [prompt + c.token_ids[:cut] for cut in cuts]
    assert state_prompts_sent == expected
    assert len(batch) > 0 and all(p in expected for p in batch.prompt_ids)
    for i in range(len(batch)):  # the state a sample's prompt_ids came from, and its dataset prompt
        assert batch.prompt_ids[i][0] == 100 + batch.prompt_index[i].item()
        assert batch.rows[i] is ROWS[batch.prompt_index[i].item()]
    # the verifier judged the whole response: prefix then continuation
    for i in range(len(batch)):
        prefix = batch.prompt_ids[i][1:]
        n = int(batch.lengths[i])
        assert batch.texts[i] == " ".join(map(str, prefix + batch.response_ids[i, :n].tolist()))
        assert batch.rewards[i].item() == float(7 in prefix + batch.response_ids[i, :n].tolist())


def test_flat_states_are_dropped_and_keys_follow_the_group_ids():
    engine = FakeEngine()
    batch = FR3ESampler(base_n=4, k=2, branch_score="surprisal")(ROWS, fake_context(engine), first_group_id=10)
    explored = engine.calls[1][0]
    groups = batch.group_ids.unique()
    assert 0 < len(groups) < len(explored)  # some states were flat (all continuations alike) and are gone
    for g in groups.tolist():
        rows = batch.group_ids == g
        assert batch.rewards[rows].unique().numel() == 2  # every surviving state is mixed
        assert batch.estimator_inputs["base_ids"][rows].unique().tolist() == [10 + (g - 10) // 3 * 3]
        assert batch.estimator_inputs["state_index"][rows].unique().tolist() == [(g - 10) % 3]
        assert len({tuple(batch.prompt_ids[i]) for i in rows.nonzero()[:, 0].tolist()}) == 1
    assert batch.estimator_inputs["state_index"].eq(0).any() and batch.estimator_inputs["state_index"].gt(0).any()
    advantages = compute_advantages("fr3e", batch.rewards, batch.group_ids, batch.response_mask,
                                    scorable=batch.scorable, **batch.estimator_inputs)
    assert advantages.abs().sum() > 0


def test_flat_states_are_explored_again_up_to_max_state_rounds():
    one, three = FakeEngine(), FakeEngine()
    FR3ESampler(k=2, branch_score="surprisal", max_state_rounds=1)(ROWS, fake_context(one), first_group_id=0)
    sampler = FR3ESampler(k=2, branch_score="surprisal", max_state_rounds=3)
    batch = sampler(ROWS, fake_context(three), first_group_id=0)
    assert len(three.calls) > 2 and len(three.calls) <= 4
    second_round = three.calls[2]
    assert second_round[1].seed != three.calls[1][1].seed  # fresh continuations
    assert set(map(tuple, second_round[0])) < set(map(tuple, three.calls[1][0]))  # only the flat states again
    m = sampler.step_metrics()
    assert m["fr3e/explore_rounds"] == len(three.calls) - 1
    kept_one = FR3ESampler(k=2, branch_score="surprisal")(ROWS, fake_context(FakeEngine()), first_group_id=0)
    assert batch.group_ids.unique().numel() >= kept_one.group_ids.unique().numel()


def test_all_flat_gives_an_empty_batch_with_estimator_inputs():
    def all_wrong(batch):
        seven_anywhere(batch)
        batch.rewards = torch.zeros(len(batch))

    ctx = fake_context(FakeEngine())
    ctx.score = all_wrong
    sampler = FR3ESampler(k=2, branch_score="surprisal")
    batch = sampler(ROWS, ctx, first_group_id=0)
    assert len(batch) == 0 and set(batch.estimator_inputs) == {"base_ids", "state_index"}
    assert sampler.step_metrics()["fr3e/states_kept_frac"] == 0.0


def test_entropy_branch_points_come_from_token_stats():
    seen = []

    def token_stats(batch):  # entropy highest at the last response token
        seen.append(len(batch))
        entropies = batch.response_mask * torch.arange(batch.response_mask.shape[1]).float()
        return type("Stats", (), {"entropies": entropies * (batch.response_mask.sum(-1, keepdim=True) > 0)})()

    engine = FakeEngine()
    sampler = FR3ESampler(k=1, branch_score="entropy")
    sampler(ROWS, fake_context(engine, token_stats=token_stats), first_group_id=0)
    assert seen and seen[0] <= 2 * len(ROWS)
    explored, base = engine.calls[1][0], engine.calls[0][2]
    lasts = {tuple(engine.calls[0][0][c.prompt_index] + c.token_ids[:-1]) for c in base}
    assert all(tuple(p) in lasts for p in explored[1::2])  # the cut is at each kept response's last token
    m = sampler.step_metrics()
    assert m["fr3e/branch_pos_rel_mean"] > 0.5 and m["fr3e/time/branch_scoring"] >= 0
    ctx = fake_context(FakeEngine())
    with pytest.raises(ValueError, match="branch_score: entropy needs .* Fix: pass token_stats, or set branch_score="):
        sampler(ROWS, ctx, first_group_id=0)


def test_step_metrics_report_and_reset():
    sampler = FR3ESampler(base_n=4, k=2, branch_score="surprisal")
    engine = FakeEngine()
    batch = sampler(ROWS, fake_context(engine), first_group_id=0)
    generated = [c for _, _, completions in engine.calls for c in completions]
    m = sampler.step_metrics()
    assert m["fr3e/rollouts_per_prompt"] == len(generated) / len(ROWS)
    assert m["fr3e/tokens_per_prompt"] == sum(len(c.token_ids) for c in generated) / len(ROWS)
    explored = len(engine.calls[1][0])
    assert m["fr3e/states_kept_frac"] == batch.group_ids.unique().numel() / explored
    assert {"fr3e/value/state_0", "fr3e/value/state_1", "fr3e/base_reward_mean", "fr3e/time/base",
            "fr3e/time/explore", "fr3e/bases_kept_per_prompt"} <= m.keys()
    assert 0 <= m["fr3e/value/state_0"] <= 1 and 0 <= m["fr3e/branch_pos_rel_mean"] < 1
    assert sampler.step_metrics() == {}


def test_sampler_options_are_checked_with_the_fix():
    built = SAMPLERS.build(PluginSpec("fr3e", {"k": 2, "branch_score": "surprisal"}))
    assert built.capabilities.needs_groups and built.impl.k == 2
    for options, message in (({"k": 0}, r"options.k: must be an integer >= 1, got 0. Fix"),
                             ({"c_max": 0, "w_max": 0}, r"c_max/w_max: both 0 keeps no base .* Fix"),
                             ({"branch_score": "logit"}, r"branch_score: unknown 'logit'. Fix: use one of")):
        with pytest.raises(ValueError, match=message):
            FR3ESampler(**options)


# ---------------------------------------------------------------- end to end (tiny model, vLLM)
# 2 prompts x (2 base + 2 kept x 2 states x 4 continuations) = 36 rollouts per step
SMALL = ["trainer.total_steps=3", "reward.verifier=rl_tasks:contains_seven", "trainer.prompts_per_step=2",
         "algorithm.sampler.options.base_n=2", "algorithm.sampler.options.k=1", "algorithm.max_sample_rounds=1"]


def test_fr3e_recipe_runs_three_steps(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, "fr3e", "+recipe=fr3e", *SMALL)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["rollout/logprob_gap_max"] < 1e-4  # continuations are scored under their state's prefix
        assert 0 < m["fr3e/tokens_per_prompt"] <= 16 * m["fr3e/rollouts_per_prompt"]
        assert 0 < m["fr3e/states_kept_frac"] <= 1 and "fr3e/value/state_0" in m
        assert m["batch/samples_trained"] > 0 and m["actor/advantage_abs_mean"] > 0


def test_fr3e_composes_with_grpo_lambda(tmp_path, tiny_model_dir):
    if "grpo_lambda" not in SHAPERS:
        pytest.skip("reward shaper grpo_lambda is not registered in this tree yet")
    metrics = run(tmp_path, tiny_model_dir, "fr3e_lambda", "+recipe=fr3e", "algorithm.reward_shaper=grpo_lambda",
                  *SMALL)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["rollout/logprob_gap_max"] < 1e-4 for m in metrics)


# ---------------------------------------------------------------- paragraph blocks and the scoring text


def test_paragraph_cuts_hand_positions():
    """Text "A.\\n\\nB\\n\\nC\\n\\nD": breaks completed by token 1, by token 4 (its "\\n" starts in token 3) and by
    token 5, so cuts 2, 5, 6. The released code splits on "\\n\\n" into A. | B | C | D, drops the answer D and
    merges 3 blocks into K=2 as (A., B) (C): prefixes end after "B\\n\\n" (cut 5) and "C\\n\\n" (cut 6)."""
    tokens = ["A", ".\n\n", "B", "\n", "\nC", "\n\n", "D"]
    assert paragraph_cuts(tokens, 4) == [2, 5, 6]
    assert paragraph_cuts(tokens, 3) == [2, 5, 6]
    assert paragraph_cuts(tokens, 2) == [5, 6]
    assert paragraph_cuts(tokens, 1) == [6]
    assert paragraph_cuts(["A", "\n\n\n\n", "B"], 4) == [2]  # two breaks in one token: one cut
    assert paragraph_cuts(["A", "\n", "B"], 4) == []  # no paragraph break: only S_0 is explored
    assert paragraph_cuts(["A", "\n\n"], 4) == []  # a break at the very end leaves nothing to resample


class ParagraphTokenizer(FakeTokenizer):
    """Token 9 decodes to a paragraph break when decoded alone."""

    def batch_decode(self, ids, skip_special_tokens=True):
        if all(len(row) == 1 for row in ids):
            return ["\n\n" if row[0] == 9 else str(row[0]) for row in ids]
        return super().batch_decode(ids, skip_special_tokens)


def test_paragraph_branch_states_are_prefixes_up_to_each_break_as_token_ids():
    engine = FakeEngine()
    ctx = dataclasses.replace(fake_context(engine), tokenizer=ParagraphTokenizer())
    FR3ESampler(base_n=4, k=10, branch_score="paragraph")(ROWS, ctx, first_group_id=0)
    (base_prompts, _, base), (sent, _, _) = engine.calls
    correct = torch.tensor([7 in c.token_ids for c in base])
    expected = []
    for row in keep_bases(torch.tensor([c.prompt_index for c in base]), correct, torch.ones_like(correct), 1, 1):
        c, prompt = base[row], base_prompts[base[row].prompt_index]
        cuts = [i + 1 for i, t in enumerate(c.token_ids) if t == 9 and i + 1 < len(c.token_ids)]
        expected += [prompt] + [prompt + c.token_ids[:cut] for cut in cuts]
    assert sent == expected and len(sent) > len(set(map(tuple, base_prompts)))  # some breaks were found


def test_score_continuation_judges_the_continuation_alone():
    engine = FakeEngine()
    batch = FR3ESampler(base_n=4, k=2, branch_score="surprisal", score="continuation")(
        ROWS, fake_context(engine), first_group_id=0)
    assert len(batch) > 0
    differs = 0
    for i in range(len(batch)):
        continuation = batch.response_ids[i, :int(batch.lengths[i])].tolist()
        assert batch.texts[i] == " ".join(map(str, continuation))
        assert batch.rewards[i].item() == float(7 in continuation)
        differs += 7 in batch.prompt_ids[i][1:] and 7 not in continuation  # full scoring would give 1 here
    assert differs > 0
    with pytest.raises(ValueError, match="options.score"):
        FR3ESampler(score="prefix")
