"""What a step reports about its samples: the fresh-sample reward beside the trained-batch reward (the same
measure for every sampler), and samples.jsonl holding every kind of sample with what it is."""
import json

import pytest
import torch

from rlkit.algorithms.shaping import none as no_shaping
from rlkit.batch import RolloutBatch
from rlkit.sampling import collect
from rlkit.sampling.collect import ScoredSample
from rlkit.sampling.critique import CritiqueSampler
from rlkit.sampling.filters import drop_zero_variance, keep_all
from rlkit.sampling.fr3e import FR3ESampler
from rlkit.trainer.metrics import (MetricsLogger, pick_samples, process_memory_gib, reward_views, step_metrics,
                                   trained_tokens)
from test_critique import ROWS as QUESTIONS, _context as critique_context, tokenizer  # noqa: F401 (fixture)
from test_fr3e import ROWS, FakeEngine, fake_context


def _collect(sampler, ctx, rows, group_filter=keep_all):
    return collect(lambda: rows, ctx, sampler=sampler, group_filter=group_filter, shaper=no_shaping,
                   prompts=len(rows), max_rounds=1, first_group_id=0, pad_id=0)


def _sample(kind, reward, scorable=True):
    return ScoredSample(kind, reward, reward == 1.0, scorable, "q", "7", "r", None, {})


def test_fresh_and_trained_rewards_by_hand():
    # fresh: 1, 0, 0 and one unscorable (left out of the mean, counted wrong in the accuracy); branches 1, 1
    scored = [_sample("fresh", 1.0), _sample("fresh", 0.0), _sample("fresh", 0.0), _sample("fresh", 0.0, False),
              _sample("branch", 1.0), _sample("branch", 1.0)]
    batch = RolloutBatch(prompt_ids=[[1]] * 3, response_ids=torch.ones(3, 1, dtype=torch.long),
                         response_mask=torch.ones(3, 1), behavior_logprobs=torch.zeros(3, 1),
                         group_ids=torch.zeros(3, dtype=torch.long), prompt_index=torch.zeros(3, dtype=torch.long),
                         truncated=torch.zeros(3, dtype=torch.bool), rows=[{}] * 3, texts=[""] * 3,
                         correct=torch.tensor([True, True, False]), scorable=torch.tensor([True, True, False]),
                         rewards=torch.tensor([0.5, 0.5, 0.0]))  # shaped: the views read the verifier's rewards
    views = reward_views(scored, batch, verifier_rewards=torch.tensor([1.0, 1.0, 0.0]))
    assert views == pytest.approx({"reward/fresh_mean": 1 / 3, "reward/fresh_accuracy": 1 / 4,
                                   "reward/trained_mean": 1.0, "reward/trained_accuracy": 2 / 3})


def test_fr3e_fresh_reward_is_its_base_responses_not_the_trained_branches():
    engine, sampler = FakeEngine(), FR3ESampler(base_n=4, k=2, branch_score="surprisal")
    collected = _collect(sampler, fake_context(engine), ROWS)
    base = engine.calls[0][2]  # the first-return call: base responses, never returned by the sampler
    base_rewards = [float(7 in c.token_ids) for c in base]
    views = reward_views(collected.scored, collected.batch, collected.verifier_rewards)
    assert views["reward/fresh_mean"] == sum(base_rewards) / len(base_rewards)
    assert views["reward/fresh_mean"] == sampler.step_metrics()["fr3e/base_reward_mean"]
    trained = collected.batch
    assert set(trained.kind) == {"branch"} and len(trained) > 0
    assert views["reward/trained_mean"] == trained.correct.float().mean().item()
    assert views["reward/trained_mean"] != views["reward/fresh_mean"]  # the two measures differ on this draw
    assert [s.kind for s in collected.scored].count("fresh") == len(base)
    branches = [s for s in collected.scored if s.kind == "branch"]
    assert {s.notes["state_index"] for s in branches} <= {0, 1, 2} and len(branches) == len(engine.calls[1][2])


def test_resampled_rounds_count_every_fresh_sample():
    engine = FakeEngine()
    ctx = fake_context(engine, n=4)
    collected = collect(lambda: ROWS, ctx, sampler=lambda rows, c, first_group_id: _group(rows, c, first_group_id),
                        group_filter=drop_zero_variance, shaper=no_shaping, prompts=len(ROWS), max_rounds=3,
                        first_group_id=0, pad_id=0)
    drawn = [c for call in engine.calls for c in call[2]]
    assert len(collected.scored) == len(drawn) == collected.rounds * len(ROWS) * 4
    views = reward_views(collected.scored, collected.batch, collected.verifier_rewards)
    assert views["reward/fresh_mean"] == sum(7 in c.token_ids for c in drawn) / len(drawn)


def _group(rows, ctx, first_group_id):
    from rlkit.sampling.samplers import sample_groups

    return sample_groups(rows, ctx, first_group_id=first_group_id)


def test_critique_samples_log_initial_responses_and_refinements_with_their_critiques(tmp_path, tokenizer):  # noqa: F811
    def reply(text, j):
        if "An earlier attempt" in text:
            return ("so 7" if "no 1" in text else "so 8"), "stop"  # only the first response's refinement is right
        return ["no 1", "yes 7", "no 2", "no 3"][j], "stop"

    ctx, _ = critique_context(tokenizer, reply)
    collected = _collect(CritiqueSampler(k=1), ctx, QUESTIONS)
    views = reward_views(collected.scored, collected.batch, collected.verifier_rewards)
    assert views["reward/fresh_mean"] == 0.25  # one right initial response of four per question
    assert views["reward/trained_mean"] == 0.5  # per question: three initial (one right) + the right refinement

    class Logging:
        console_every, tensorboard, wandb = 0, False, False

    logger = MetricsLogger(tmp_path, Logging())
    logger.log_samples(3, pick_samples(collected.scored, 2))
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [line["kind"] for line in lines] == ["fresh", "fresh", "refinement", "refinement"]
    assert [line["response"] for line in lines[:2]] == ["no 1", "yes 7"]
    assert lines[2]["critique"] == "The attempt is incorrect. The reference answer is 7."
    assert lines[3]["critique"] == "The attempt is correct. The reference answer is 7."
    assert all(line["step"] == 3 and line["question"] == "What is 3 + 4?" for line in lines)


def test_pick_samples_takes_the_first_of_each_kind():
    scored = [_sample("branch", 1.0), _sample("fresh", 0.0), _sample("fresh", 1.0), _sample("fresh", 1.0)]
    assert [(s.kind, s.reward) for s in pick_samples(scored, 2)] == [("fresh", 0.0), ("fresh", 1.0), ("branch", 1.0)]


def test_trained_tokens_count_each_prompt_per_row_and_once():
    # two groups: prompt [1, 2, 3] answered by responses of 2 and 4 tokens, prompt [5] by one of 1 token
    batch = RolloutBatch(prompt_ids=[[1, 2, 3], [1, 2, 3], [5]], response_ids=torch.ones(3, 4, dtype=torch.long),
                         response_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]),
                         behavior_logprobs=torch.zeros(3, 4), group_ids=torch.tensor([0, 0, 1]),
                         prompt_index=torch.tensor([0, 0, 1]), truncated=torch.zeros(3, dtype=torch.bool),
                         rows=[{}] * 3, texts=[""] * 3)
    assert trained_tokens(batch) == {"batch/tokens_trained": 7 + 3 + 3 + 1, "batch/tokens_trained_distinct": 7 + 3 + 1}


def test_step_metrics_report_this_process_memory():
    before, peak_before = process_memory_gib()
    block = torch.ones(2**28 // 4)  # 256 MiB, touched
    during, peak_during = process_memory_gib()
    assert during - before > 0.2 and peak_during >= during > 0
    del block
    after, peak_after = process_memory_gib()
    assert during - after > 0.2 and peak_after > after + 0.2  # the peak remembers the freed block
    m = step_metrics({"step": 2.0}, {"response/tokens": 10.0}, lr=1e-3, rounds=1)
    assert m["perf/tokens_per_s"] == 5.0 and m["perf/rss_peak_gib"] >= peak_after and m["perf/rss_gib"] > 0
