"""FR3E's two-stage rollouts: first return, then entropy-eliciting explore (arXiv 2507.07017; docs/algorithms.md).

1. First return: `base_n` responses per prompt, scored; at most `c_max` correct and `w_max` wrong ones kept.
2. Branch points: each kept response's `k` most uncertain positions (entropy of the full next-token
   distribution under the current policy, or the sampled token's surprisal from the behaviour logprobs).
3. States: S_0 = the prompt, S_j = prompt ids ⊕ response ids[:c_j] (token ids, never re-tokenised); a
   state's prefix is context (its continuations' `prompt_ids`), never trained.
4. Explore: `rollout.n` continuations per state in one engine call, scored; a state whose continuations
   all score the same is explored again with a fresh seed, up to `max_state_rounds` rounds, then dropped.

The base responses are not trained; the batch holds the continuations of the surviving states with
``estimator_inputs = {"base_ids", "state_index"}`` for ``ADVANTAGES["fr3e"]``.
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from rlkit.algorithms import zero_variance_groups
from rlkit.algorithms.fr3e import state_values
from rlkit.batch import RolloutBatch
from rlkit.sampling.samplers import SAMPLERS, SamplerContext, batch_from_completions

BRANCH_SCORES = ("entropy", "surprisal", "paragraph")
SCORES = ("full", "continuation")
PARAGRAPH = "\n\n"
# Explore round r (from 1) samples with the step's seed plus r * this prime: fresh continuations, and S_0's
# are not the base responses again.
EXPLORE_SEED_STRIDE = 104_729


def keep_bases(prompt_index: torch.Tensor, correct: torch.Tensor, scorable: torch.Tensor,
               c_max: int, w_max: int) -> list[int]:
    """Rows to branch from: per prompt the first `c_max` correct and first `w_max` wrong scorable responses.

    prompt_index, correct, scorable: [B] -> row indices in batch order (unscorable rows are never kept).
    """
    taken: dict[tuple[int, bool], int] = defaultdict(int)
    kept = []
    for row, (prompt, right, ok) in enumerate(zip(prompt_index.tolist(), correct.tolist(), scorable.tolist())):
        cap = c_max if right else w_max
        if ok and taken[prompt, right] < cap:
            taken[prompt, right] += 1
            kept.append(row)
    return kept


def branch_points(scores: torch.Tensor, mask: torch.Tensor, k: int) -> list[list[int]]:
    """Cut positions per response: the `k` highest-scoring response positions, ascending.

    scores, mask: [B,T] -> B lists; a response not longer than `k` tokens gets one cut, an empty one none.
    """
    cuts = []
    for row_scores, row_mask in zip(scores, mask):
        length = int(row_mask.sum())
        take = min(k if length > k else 1, length)
        cuts.append(sorted(row_scores[:length].topk(take).indices.tolist()))
    return cuts


def paragraph_cuts(token_texts: list[str], k: int) -> list[int]:
    """Cuts at paragraph breaks (the released code's separate_by_prob=False): positions just after each
    "\n\n" of the response (found left to right, as str.split finds them), with the text after the last
    break (the answer) never a block. More than `k` blocks are merged into `k` consecutive ones, the first
    ones one block longer, and each merged block ends at its last break. token_texts: the response's tokens
    decoded one by one -> ascending cut positions (< the response length), none without a break.
    """
    text, ends, cuts = "", [], []
    for piece in token_texts:
        text += piece
        ends.append(len(text))
    breaks, start = [], 0
    while (found := text.find(PARAGRAPH, start)) >= 0:
        start = found + len(PARAGRAPH)
        cut = next(i for i, end in enumerate(ends) if end >= start) + 1  # the token completing the break
        if cut < len(token_texts) and (not breaks or cut > breaks[-1]):
            breaks.append(cut)
    quotient, remainder = divmod(len(breaks), k)
    if quotient == 0:
        return breaks
    at = 0
    for block in range(k):
        at += quotient + (1 if block < remainder else 0)
        cuts.append(breaks[at - 1])
    return cuts


def state_prompts(prompt_ids: list[int], response_ids: list[int], cuts: list[int]) -> list[list[int]]:
    """[S_0, S_1, ...]: the prompt, then prompt ⊕ response[:c] for each cut c (the token at c is resampled)."""
    return [list(prompt_ids)] + [list(prompt_ids) + list(response_ids[:c]) for c in cuts]


@dataclass(frozen=True)
class State:
    """One branch state: its token ids, the kept base response it was cut from (slot), its index j along
    that response (0 = the prompt), the dataset prompt it answers, and the prompt's own length."""

    ids: list[int]
    slot: int
    j: int
    prompt_at: int
    prompt_len: int


@SAMPLERS.register("fr3e", needs_groups=True, provides_inputs=("base_ids", "state_index"))
class FR3ESampler:
    """FR3E rollouts; ``step_metrics()`` reports the step's branching statistics (``fr3e/...``) and resets.

    branch_score: entropy | surprisal | paragraph (`paragraph_cuts`, no scoring forward). score: what the
    verifier judges for a continuation: full (the state's prefix then the continuation) or continuation
    (the continuation alone, as the released code, where a cut after the answer scores 0).
    """

    def __init__(self, *, base_n: int = 4, c_max: int = 1, w_max: int = 1, k: int = 4,
                 branch_score: str = "entropy", max_state_rounds: int = 1, score: str = "full"):
        key = "algorithm.sampler.options"
        for name, value, least in (("base_n", base_n, 1), ("c_max", c_max, 0), ("w_max", w_max, 0), ("k", k, 1),
                                   ("max_state_rounds", max_state_rounds, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{key}.{name}: must be an integer >= {least}, got {value!r}. "
                                 f"Fix: set {key}.{name}={max(least, 1)} or more")
        if c_max + w_max < 1:
            raise ValueError(f"{key}.c_max/w_max: both 0 keeps no base response to branch from. "
                             f"Fix: set {key}.c_max=1 {key}.w_max=1 (the released code)")
        if branch_score not in BRANCH_SCORES:
            raise ValueError(f"{key}.branch_score: unknown {branch_score!r}. Fix: use one of {list(BRANCH_SCORES)}")
        if score not in SCORES:
            raise ValueError(f"{key}.score: unknown {score!r}. Fix: use full (the prefix and the continuation) "
                             f"or continuation (the released code)")
        self.base_n, self.c_max, self.w_max, self.k, self.score = base_n, c_max, w_max, k, score
        self.branch_score, self.max_state_rounds = branch_score, max_state_rounds
        self._reset()

    def __call__(self, rows: list[dict], ctx: SamplerContext, *, first_group_id: int) -> RolloutBatch:
        tick = time.perf_counter()
        base = self._first_return(rows, ctx)
        self.base_s += time.perf_counter() - tick
        if not len(base):
            return _empty_batch(ctx.pad_id)
        tick = time.perf_counter()
        cuts = self._cuts(base, ctx)
        self.scoring_s += time.perf_counter() - tick
        self.cut_fractions += [c / n for row_cuts, n in zip(cuts, base.lengths.tolist()) for c in row_cuts]

        tick = time.perf_counter()
        states = [State(ids, slot, j, prompt_at, len(prompt))
                  for slot, (prompt, response, n, prompt_at, row_cuts) in enumerate(zip(
                      base.prompt_ids, base.response_ids.tolist(), base.lengths.tolist(), base.prompt_index.tolist(),
                      cuts))
                  for j, ids in enumerate(state_prompts(prompt, response[:n], row_cuts))]
        batch = self._explore(states, rows, ctx, first_group_id)
        self.explore_s += time.perf_counter() - tick
        return batch

    # ------------------------------------------------------------------ phases
    def _first_return(self, rows: list[dict], ctx: SamplerContext) -> RolloutBatch:
        """`base_n` scored responses per prompt -> the ones kept to branch from (at most c_max right, w_max wrong)."""
        prompt_ids = [ctx.build_prompt(row) for row in rows]
        completions = ctx.engine.generate(prompt_ids, dataclasses.replace(ctx.sampling, n=self.base_n))
        base = batch_from_completions(prompt_ids, rows, completions, [0] * len(completions), ctx)
        ctx.score(base)
        self.prompts += len(rows)
        self.rollouts += len(completions)
        self.tokens += int(base.lengths.sum())
        self.base_rewards += base.rewards[base.scorable].tolist()
        base = base.select(keep_bases(base.prompt_index, base.correct, base.scorable, self.c_max, self.w_max))
        self.bases_kept += len(base)
        return base

    def _cuts(self, base: RolloutBatch, ctx: SamplerContext) -> list[list[int]]:
        """Cut positions per kept base response: at paragraph breaks, or at the k most uncertain tokens."""
        if self.branch_score == "paragraph":
            return [paragraph_cuts(ctx.tokenizer.batch_decode([[t] for t in row[:n]]), self.k)
                    for row, n in zip(base.response_ids.tolist(), base.lengths.tolist())]
        return branch_points(self._branch_scores(base, ctx), base.response_mask, self.k)

    def _branch_scores(self, base: RolloutBatch, ctx: SamplerContext) -> torch.Tensor:
        """[B,T] uncertainty of each base token: full-distribution entropy, or surprisal −log p(sampled)."""
        if self.branch_score == "surprisal":
            return -base.behavior_logprobs
        if ctx.token_stats is None:
            raise ValueError("algorithm.sampler.options.branch_score: entropy needs the policy's scoring forward, "
                             "which this SamplerContext lacks (token_stats is None). "
                             "Fix: pass token_stats, or set branch_score=surprisal")
        return ctx.token_stats(base).entropies

    def _explore(self, states: list[State], rows: list[dict], ctx: SamplerContext, first_group_id: int) -> RolloutBatch:
        """`ctx.sampling.n` continuations per state in one engine call per round; a flat state is explored
        again (fresh seed) until max_state_rounds, then dropped."""
        per_base = self.k + 1
        group_of = torch.tensor([first_group_id + s.slot * per_base + s.j for s in states], dtype=torch.long)
        kept, pending, values = [], list(range(len(states))), {}
        for round_index in range(self.max_state_rounds):
            sampling = ctx.sampling
            if sampling.seed is not None:  # never the base call's seed: S_0 would repeat the base responses
                sampling = dataclasses.replace(sampling, seed=sampling.seed + (round_index + 1) * EXPLORE_SEED_STRIDE)
            prompts = [states[s].ids for s in pending]
            completions = ctx.engine.generate(prompts, sampling)
            groups = [int(group_of[pending[c.prompt_index]]) for c in completions]
            answers = [rows[states[s].prompt_at] for s in pending]
            batch = batch_from_completions(prompts, answers, completions, groups, ctx, kind="branch")
            state_at = torch.tensor(pending, dtype=torch.long)[batch.prompt_index]
            batch.notes = [{"state_index": states[s].j} for s in state_at.tolist()]
            if self.score == "full":
                batch.texts = _full_texts(batch, [states[s] for s in state_at.tolist()], ctx)
            ctx.score(batch)
            self.rollouts += len(completions)
            self.tokens += int(batch.lengths.sum())
            self.state_rounds += 1
            mean, scored = state_values(batch.rewards, batch.scorable, state_at, len(states))
            values.update({s: float(mean[s]) for s in pending if scored[s]})
            flat = zero_variance_groups(batch.rewards, batch.group_ids, batch.scorable)
            batch.prompt_index = torch.tensor([states[s].prompt_at for s in state_at.tolist()], dtype=torch.long)
            kept.append(batch.select((~flat).nonzero()[:, 0]))
            pending = sorted(set(state_at[flat].tolist()))
            if not pending:
                break
        self.states += len(states)
        self.states_kept += len(states) - len(pending)
        for s, value in values.items():
            self.values[states[s].j].append(value)
        batch = RolloutBatch.concat(kept, ctx.pad_id)
        offset = batch.group_ids - first_group_id
        batch.estimator_inputs = {"base_ids": first_group_id + offset // per_base * per_base,
                                  "state_index": offset % per_base}
        return batch

    # ------------------------------------------------------------------ metrics
    def _reset(self) -> None:
        self.prompts = self.rollouts = self.tokens = self.states = self.states_kept = self.state_rounds = 0
        self.bases_kept = 0
        self.base_s = self.scoring_s = self.explore_s = 0.0
        self.cut_fractions: list[float] = []
        self.base_rewards: list[float] = []
        self.values: dict[int, list[float]] = defaultdict(list)

    def step_metrics(self) -> dict[str, float]:
        """The step's branching statistics (every sampler call since the last report), then reset.

        Rollouts and tokens count everything generated, base responses included. base_reward_mean is the
        verifier's mean over every base response (on-policy, comparable with a plain group sampler's reward;
        the trained batch holds only mixed states). value/state_j is the mean over explored states of index j
        of their continuations' mean reward, dropped states included.
        """
        if not self.prompts:
            return {}
        m = {
            "fr3e/rollouts_per_prompt": self.rollouts / self.prompts,
            "fr3e/tokens_per_prompt": self.tokens / self.prompts,
            "fr3e/bases_kept_per_prompt": self.bases_kept / self.prompts,
            "fr3e/states_kept_frac": self.states_kept / self.states if self.states else 0.0,
            "fr3e/explore_rounds": float(self.state_rounds),
            "fr3e/time/base": self.base_s,
            "fr3e/time/branch_scoring": self.scoring_s,
            "fr3e/time/explore": self.explore_s,
        }
        if self.base_rewards:
            m["fr3e/base_reward_mean"] = sum(self.base_rewards) / len(self.base_rewards)
        if self.cut_fractions:
            m["fr3e/branch_pos_rel_mean"] = sum(self.cut_fractions) / len(self.cut_fractions)
        for j, values in sorted(self.values.items()):
            m[f"fr3e/value/state_{j}"] = sum(values) / len(values)
        self._reset()
        return m


def _full_texts(batch: RolloutBatch, states: list[State], ctx: SamplerContext) -> list[str]:
    """What the verifier judges for each row: the whole response, the state's prefix then the continuation."""
    ids = [s.ids[s.prompt_len:] + response[:n]
           for s, response, n in zip(states, batch.response_ids.tolist(), batch.lengths.tolist())]
    return ctx.tokenizer.batch_decode(ids, skip_special_tokens=True)


def _empty_batch(pad_id: int) -> RolloutBatch:
    """A scored batch of no samples, with the fields and estimator inputs every FR3E batch has."""
    none, no = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
    return RolloutBatch(
        prompt_ids=[], response_ids=torch.full((0, 1), pad_id, dtype=torch.long), response_mask=torch.zeros(0, 1),
        behavior_logprobs=torch.zeros(0, 1), group_ids=none, prompt_index=none, truncated=no, rows=[], texts=[],
        rewards=torch.zeros(0), correct=no, scorable=no, extracted=[],
        estimator_inputs={"base_ids": none, "state_index": none})
