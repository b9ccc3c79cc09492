"""One step's rollouts: sample -> verify -> filter -> resample -> shape (docs/architecture.md, "The step").

Counts prompts, not groups, so a sampler may make several groups per prompt. Filters judge the
verifier's rewards; the shaper runs once, on the joined batch that is trained, with ``scorable``.
Every sample the verifier judges is also kept as a ScoredSample, returned or not (FR3E's base responses),
for the fresh-sample reward and samples.jsonl.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch

from rlkit.batch import RolloutBatch
from rlkit.ranks import Ranks
from rlkit.registry import Plugin
from rlkit.sampling.samplers import SamplerContext

# Each resampling round draws fresh samples: its seed is the step's seed plus round * this prime.
ROUND_SEED_STRIDE = 7919


@dataclass
class ScoredSample:
    """One sample the verifier judged this step, whatever became of it (trained, filtered out, or a sampler's
    intermediate such as FR3E's base responses). kind: rlkit.batch.SAMPLE_KINDS; reward: the verifier's."""

    kind: str
    reward: float
    correct: bool
    scorable: bool
    question: str
    answer: str
    response: str
    extracted: str | None
    notes: dict


class ScoreLog:
    """A SamplerContext.score that also keeps a ScoredSample of each sample it scores."""

    def __init__(self, score: Callable[[RolloutBatch], None]):
        self.score, self.samples = score, []

    def __call__(self, batch: RolloutBatch) -> None:
        self.score(batch)
        self.samples += [
            ScoredSample(batch.kind[i], float(batch.rewards[i]), bool(batch.correct[i]), bool(batch.scorable[i]),
                         batch.rows[i]["question"], batch.rows[i]["answer"], batch.texts[i], batch.extracted[i],
                         batch.notes[i])
            for i in range(len(batch))]

    def take(self) -> list[ScoredSample]:
        samples, self.samples = self.samples, []
        return samples


@dataclass
class Collected:
    """batch: what the step trains on (rewards shaped); verifier_rewards: [len(batch)] its rewards before
    shaping; seen: every sample returned, verifier rewards; scored: every sample verified, in sampling order
    (rank by rank within a round); generated_tokens: every token the engine generated this step, including
    what a sampler did not return (FR3E's base trajectories, Critique-GRPO's critiques): the budget that
    methods are compared at."""

    batch: RolloutBatch
    verifier_rewards: torch.Tensor
    seen: RolloutBatch
    scored: list[ScoredSample]
    next_group_id: int
    rounds: int
    generate_s: float
    reward_s: float
    generated_tokens: int


class CountingEngine:
    """A rollout engine that counts the tokens it generates; everything else goes to the wrapped engine."""

    def __init__(self, engine):
        self.engine = engine
        self.tokens = 0

    def generate(self, prompts, sampling):
        completions = self.engine.generate(prompts, sampling)
        self.tokens += sum(len(c.token_ids) for c in completions)
        return completions

    def __getattr__(self, name):
        return getattr(self.engine, name)


def collect(
    next_rows: Callable[[], list[dict]],
    ctx: SamplerContext,
    *,
    sampler: Plugin,
    group_filter: Plugin,
    shaper: Plugin,
    prompts: int,
    max_rounds: int,
    first_group_id: int,
    pad_id: int,
    policy_version: int = 0,
    ranks: Ranks = Ranks(),
) -> Collected:
    """Sample rounds of `next_rows()` until `prompts` prompts survive `group_filter` (at most `max_rounds`).

    The first `prompts` surviving prompts are kept with all their groups; prompt_index becomes the
    prompt's position among every prompt drawn this step. Every sample is stamped with `policy_version`,
    the version of the weights the engine holds.

    Over several ranks, `next_rows()` gives every rank the same global rows; each samples and scores its
    share, with seeds shifted by the share's start (prompt i of a request is sampled from seed + i*n), so a
    sample depends on its prompt's global position and not on the world size. The round's samples are then
    gathered: filter, prompt count and shaper see the global batch and every rank ends its rounds together.
    `batch` and `seen` are the global batches, the same on every rank.
    """
    kept, seen, scored, drawn, group_id = [], [], [], 0, first_group_id
    generate_s = reward_s = 0.0
    base_sampling, engine, score = ctx.sampling, ctx.engine, ctx.score
    ctx.engine, ctx.score = counter, log = CountingEngine(engine), ScoreLog(score)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        rows = next_rows()
        share = ranks.share(len(rows))
        seed = _round_seed(base_sampling.seed, rounds - 1)
        ctx.sampling = dataclasses.replace(base_sampling, seed=None if seed is None else seed + share.start * base_sampling.n)
        tick = time.perf_counter()
        batch = sampler(rows[share], ctx, first_group_id=ranks.first_group_id(group_id))
        generate_s += time.perf_counter() - tick
        tick = time.perf_counter()
        if batch.rewards is None:
            ctx.score(batch)
        reward_s += time.perf_counter() - tick
        batch.prompt_index = batch.prompt_index + drawn + share.start
        batch.policy_version = torch.full((len(batch),), policy_version, dtype=torch.long)
        batch = ranks.gather_batch(batch, pad_id)
        scored += [sample for part in ranks.gather(log.take()) for sample in part]
        if len(batch):
            group_id = int(batch.group_ids.max()) + 1
        drawn += len(rows)
        seen.append(batch)
        kept.append(batch.select(group_filter(batch).nonzero()[:, 0]))
        if _prompt_count(kept) >= prompts:
            break
    ctx.sampling, ctx.engine, ctx.score = base_sampling, engine, score
    batch = RolloutBatch.concat(kept, pad_id)
    first = batch.prompt_index.unique(sorted=True)[:prompts]
    batch = batch.select(torch.isin(batch.prompt_index, first).nonzero()[:, 0])
    verifier_rewards = batch.rewards.clone()
    tick = time.perf_counter()
    batch.rewards = shaper(batch.rewards, batch.correct, batch.lengths, batch.group_ids, scorable=batch.scorable)
    reward_s += time.perf_counter() - tick
    return Collected(batch, verifier_rewards, RolloutBatch.concat(seen, pad_id), scored, group_id, rounds,
                     generate_s, reward_s, int(ranks.sum(counter.tokens)))


def _round_seed(seed: int | None, round_index: int) -> int | None:
    return None if seed is None else seed + round_index * ROUND_SEED_STRIDE


def _prompt_count(batches: list[RolloutBatch]) -> int:
    return torch.cat([b.prompt_index for b in batches]).unique().numel()
