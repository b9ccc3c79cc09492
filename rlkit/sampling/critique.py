"""Critique-GRPO's sampler (docs/algorithms.md, "Critique-GRPO").

Per prompt: n initial responses, scored; one critique of each; one refinement of each, sampled from
the policy with a prompt holding the question, the response and the critique; the refinements scored;
the group is the first n-k initial responses plus k refinements (correct ones first). Refinements are
trained as answers to the question alone: their ``prompt_ids`` are the original prompt,
``extras["is_refinement"]`` marks them and ``off_context`` makes the trainer recompute their old
logprobs under that prompt (their behaviour logprobs came from the critique context).
"""
from __future__ import annotations

import dataclasses
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from rlkit.batch import RolloutBatch
from rlkit.data.prompts import build_prompt
from rlkit.rollout.base import Completion, SamplingConfig
from rlkit.sampling.samplers import SAMPLERS, SamplerContext, batch_from_completions

SOURCES = ("ground_truth", "indicative", "model")
KEY = "algorithm.sampler.options"

# Seed offsets of the refinement and self-critique requests from the step's sampling seed (primes, far from
# the collect loop's round stride), so no request reuses an initial response's random stream.
REFINE_SEED_OFFSET = 104_729
CRITIC_SEED_OFFSET = 224_737

CRITIC_PROMPT = (
    "You are grading an attempted solution to a math problem.\n\n"
    "Problem:\n{question}\n\n"
    "{reference}\n\n"
    "Attempted solution:\n{response}\n\n"
    "Check the attempt one step at a time and explain every mistake you find. "
    "End with a last line that is exactly `Conclusion: right` or `Conclusion: wrong`."
)
REFINE_PROMPT = (
    "Question:\n{question}\n\n"
    "An earlier attempt:\n{response}\n\n"
    "Feedback on that attempt:\n{critique}\n\n"
    "Use the feedback to solve the question again, fixing any mistakes."
)
# The critic's reference: the worked solution where the data has one (data.solution_column), else the answer.
REFERENCE_SOLUTION = "Reference solution:\n{solution}"
REFERENCE_ANSWER = "Reference answer: {answer}"
_CONCLUSION = re.compile(r"conclusion\s*:\s*\**\s*(right|wrong)\b", re.IGNORECASE)


def rule_critique(correct: bool, answer: str | None) -> str:
    """The verifier's verdict as a critique; with the reference answer unless `answer` is None (indicative)."""
    verdict = "The attempt is correct." if correct else "The attempt is incorrect."
    return verdict if answer is None else f"{verdict} The reference answer is {answer}."


def critic_prompt(row: dict, response: str) -> str:
    """The chain-of-thought critic's request for one response (rlkit's wording, docs/algorithms.md)."""
    reference = (REFERENCE_SOLUTION.format(solution=row["solution"]) if row.get("solution")
                 else REFERENCE_ANSWER.format(answer=row["answer"]))
    return CRITIC_PROMPT.format(question=row["question"], reference=reference, response=response)


def critique_conclusion(text: str | None) -> str | None:
    """"right" or "wrong" from a chain-of-thought critique's last `Conclusion:` line; None when it has none."""
    found = _CONCLUSION.findall(text or "")
    return found[-1].lower() if found else None


def select_refinements(prompt_index: torch.Tensor, correct: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of the refinements to keep: per prompt, k of them, correct ones first, else in sampling order.

    prompt_index [R] long, correct [R] bool -> kept row indices (ascending by prompt, then rank).
    """
    order = sorted(range(len(prompt_index)), key=lambda i: (int(prompt_index[i]), not bool(correct[i]), i))
    kept, taken = [], {}
    for i in order:
        p = int(prompt_index[i])
        if taken.get(p, 0) < k:
            kept.append(i)
            taken[p] = taken.get(p, 0) + 1
    return torch.tensor(kept, dtype=torch.long)


@SAMPLERS.register("critique", needs_groups=True, provides_extras=("is_refinement",))
class CritiqueSampler:
    """`algorithm.sampler=critique`: initial responses plus critique-guided refinements (module docstring).

    Options: k refinements kept per prompt (k < rollout.n); source of the critiques: ground_truth (the
    verdict and the reference answer), indicative (the verdict only) or model (a chain-of-thought
    critique of each response the verifier marks wrong, written by the policy through the rollout engine,
    or by the OpenAI-compatible endpoint at `url` serving `model` when a url is set; correct responses get
    the ground_truth text). A model critique that fails, times out (`timeout_s`, `retries` more tries)
    or has no `Conclusion: right|wrong` line is replaced by the ground_truth text and counted.
    critic_max_tokens/temperature/top_p: the critic's sampling; critic_max_tokens null: as many as fit,
    max_model_len (the policy engine's prompt + response budget, the recipe's rollout.engine.options.max_model_len)
    minus rollout.max_tokens (the refinement's answer) minus the longest critic prompt of the call, or the
    endpoint's own limit (no max_tokens sent). The critic
    sees the row's reference solution where the data has one (data.solution_column), else the answer.
    api_key_env names the environment
    variable holding the endpoint's bearer token (None: no token); concurrency: requests in flight.
    """

    def __init__(self, *, k: int = 1, source: str = "ground_truth", url: str | None = None, model: str | None = None,
                 timeout_s: float = 60.0, retries: int = 2, critic_max_tokens: int | None = None,
                 max_model_len: int = 1024,
                 critic_temperature: float = 0.7, critic_top_p: float = 0.75, api_key_env: str | None = None,
                 concurrency: int = 8):
        if source not in SOURCES:
            raise ValueError(f"{KEY}.source: unknown critique source {source!r}. Fix: use one of {list(SOURCES)}")
        if k < 1:
            raise ValueError(f"{KEY}.k: must be >= 1 refinement per prompt, got {k}. Fix: set it to 1 (the paper)")
        if url is not None and source != "model":
            raise ValueError(f"{KEY}.url: a critic endpoint is only used with source=model, got source={source}. "
                             f"Fix: set {KEY}.source=model or remove the url")
        if url is not None and not model:
            raise ValueError(f"{KEY}.model: the endpoint at {url} needs the served model's name. "
                             f"Fix: set +{KEY}.model=NAME (GET {url.rstrip('/')}/models lists them)")
        if timeout_s <= 0 or retries < 0 or concurrency < 1 or (critic_max_tokens or 1) < 1 or max_model_len < 2:
            raise ValueError(f"{KEY}: timeout_s > 0, retries >= 0, concurrency >= 1, critic_max_tokens >= 1 (or null) "
                             f"and max_model_len >= 2 are needed, got {timeout_s}, {retries}, {concurrency}, "
                             f"{critic_max_tokens}, {max_model_len}. Fix: e.g. timeout_s=60 retries=2 concurrency=8 "
                             "critic_max_tokens=null")
        self.k, self.source, self.url, self.model = k, source, url, model
        self.timeout_s, self.retries, self.concurrency = timeout_s, retries, concurrency
        self.api_key_env, self.critic_max_tokens, self.max_model_len = api_key_env, critic_max_tokens, max_model_len
        self.critic_sampling = SamplingConfig(n=1, temperature=critic_temperature, top_p=critic_top_p)
        self._counts: dict[str, float] = {}

    # ------------------------------------------------------------------ the sampler
    def __call__(self, rows: list[dict], ctx: SamplerContext, *, first_group_id: int) -> RolloutBatch:
        n = ctx.sampling.n
        if self.k >= n:
            raise ValueError(f"{KEY}.k: k={self.k} refinements leave no initial response in groups of rollout.n={n}. "
                             f"Fix: set rollout.n > k (the paper: n=8, k=1)")
        prompt_ids = [ctx.build_prompt(row) for row in rows]
        completions = ctx.engine.generate(prompt_ids, ctx.sampling)
        initial = batch_from_completions(prompt_ids, rows, completions,
                                         [first_group_id + c.prompt_index for c in completions], ctx)
        ctx.score(initial)
        critiques = self.critiques(initial, ctx)
        refined = self.refine(initial, critiques, prompt_ids, ctx)
        kept_refined = refined.select(select_refinements(refined.prompt_index, refined.correct, self.k))
        kept_initial = torch.cat([(initial.prompt_index == p).nonzero()[: n - self.k, 0] for p in range(len(rows))])
        batch = RolloutBatch.concat([initial.select(kept_initial), kept_refined], ctx.pad_id)
        is_refinement = torch.arange(len(batch)) >= len(kept_initial)
        batch.extras["is_refinement"] = is_refinement
        batch.off_context = is_refinement.clone()
        batch = batch.select(torch.argsort(batch.prompt_index, stable=True))  # each group's samples together
        self._count(initial, refined, kept_refined, len(rows))
        return batch

    def refine(self, initial: RolloutBatch, critiques: list[str], prompt_ids: list[list[int]],
               ctx: SamplerContext) -> RolloutBatch:
        """One refinement per initial response, scored; prompt_ids are the original prompts. -> [len(initial)]."""
        refine_prompts = [
            ctx.build_prompt({**row, "question": REFINE_PROMPT.format(question=row["question"], response=text,
                                                                      critique=critique)})
            for row, text, critique in zip(initial.rows, initial.texts, critiques)]
        seed = ctx.sampling.seed
        sampling = dataclasses.replace(ctx.sampling, n=1, seed=None if seed is None else seed + REFINE_SEED_OFFSET)
        completions = ctx.engine.generate(refine_prompts, sampling)
        source = initial.prompt_index.tolist()
        refined = batch_from_completions([prompt_ids[p] for p in source], initial.rows, completions,
                                         initial.group_ids.tolist(), ctx, kind="refinement")
        refined.prompt_index = initial.prompt_index.clone()
        refined.notes = [{"critique": critique} for critique in critiques]
        ctx.score(refined)
        return refined

    # ------------------------------------------------------------------ critiques
    def critiques(self, initial: RolloutBatch, ctx: SamplerContext) -> list[str]:
        """One critique text per initial response."""
        answers = [row["answer"] for row in initial.rows]
        correct = initial.correct.tolist()
        if self.source == "indicative":
            return [rule_critique(c, None) for c in correct]
        fallback = [rule_critique(c, a) for c, a in zip(correct, answers)]
        if self.source == "ground_truth":
            return fallback
        wrong = [i for i, c in enumerate(correct) if not c]
        prompts = [critic_prompt(initial.rows[i], initial.texts[i]) for i in wrong]
        tick = time.perf_counter()
        written = self._ask_endpoint(prompts) if self.url is not None else self._ask_policy(prompts, ctx)
        self._add("critic_s", time.perf_counter() - tick)
        out = list(fallback)
        for i, text in zip(wrong, written):
            if critique_conclusion(text) is None:
                self._add("fallbacks", 1)
            else:
                out[i] = text.strip()
        self._add("model_critiques", len(wrong))
        return out

    def _ask_policy(self, prompts: list[str], ctx: SamplerContext) -> list[str | None]:
        """Critiques written by the policy itself through the rollout engine (chat template, no answer format)."""
        if not prompts:
            return []
        ids = [build_prompt(ctx.tokenizer, text) for text in prompts]
        room = self.max_model_len - ctx.sampling.max_tokens  # the refinement, holding the critique, needs its answer
        fits = [i for i, p in enumerate(ids) if len(p) < room]  # the others fall back to ground_truth
        if not fits:
            return [None] * len(prompts)
        budget = room - max(len(ids[i]) for i in fits)  # what every request of the call can write
        seed = ctx.sampling.seed
        sampling = dataclasses.replace(self.critic_sampling, seed=None if seed is None else seed + CRITIC_SEED_OFFSET,
                                       stop_token_ids=ctx.sampling.stop_token_ids,
                                       max_tokens=min(self.critic_max_tokens or budget, budget))
        completions: list[Completion] = ctx.engine.generate([ids[i] for i in fits], sampling)
        texts = ctx.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        out: list[str | None] = [None] * len(prompts)
        for i, text in zip(fits, texts):
            out[i] = text
        return out

    def _ask_endpoint(self, prompts: list[str]) -> list[str | None]:
        """Critiques from the OpenAI-compatible chat endpoint; None where every try failed."""
        import httpx

        headers = {}
        if self.api_key_env is not None:
            token = os.environ.get(self.api_key_env)
            if not token:
                raise ValueError(f"{KEY}.api_key_env: the environment variable {self.api_key_env} is not set. "
                                 f"Fix: export {self.api_key_env}=TOKEN or remove the option")
            headers["Authorization"] = f"Bearer {token}"
        endpoint = f"{self.url.rstrip('/')}/chat/completions"
        with httpx.Client(timeout=self.timeout_s, headers=headers) as client, \
                ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda prompt: self._ask_once(client, endpoint, prompt), prompts))

    def _ask_once(self, client, endpoint: str, prompt: str) -> str | None:
        import httpx

        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": self.critic_sampling.temperature, "top_p": self.critic_sampling.top_p}
        if self.critic_max_tokens is not None:
            body["max_tokens"] = self.critic_max_tokens
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            try:
                reply = client.post(endpoint, json=body)
            except httpx.HTTPError:
                self._add("critic_errors", 1)
                continue
            if reply.status_code == 429 or reply.status_code >= 500:
                self._add("critic_errors", 1)
                continue
            try:
                content = reply.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                self._add("critic_errors", 1)
                return None  # a 4xx or an unexpected body: retrying sends the same request
            return content if isinstance(content, str) else None
        return None

    # ------------------------------------------------------------------ metrics
    def _add(self, key: str, value: float) -> None:
        self._counts[key] = self._counts.get(key, 0.0) + value

    def _count(self, initial: RolloutBatch, refined: RolloutBatch, kept: RolloutBatch, prompts: int) -> None:
        self._add("prompts", prompts)
        self._add("initial", len(initial))
        self._add("initial_correct", float(initial.correct.sum()))
        self._add("refinements", len(refined))
        self._add("refinements_correct", float(refined.correct.sum()))
        self._add("refinement_tokens", float(refined.lengths.sum()))
        self._add("refinements_truncated", float(refined.truncated.sum()))
        self._add("kept", len(kept))
        self._add("kept_correct", float(kept.correct.sum()))
        self._add("rescued", float((~_any_per_prompt(initial, prompts) & _any_per_prompt(kept, prompts)).sum()))

    def step_metrics(self) -> dict[str, float]:
        """critique/* over every call since the last report (all sampling rounds of the step), then resets."""
        c, self._counts = self._counts, {}
        if not c.get("prompts"):
            return {}
        metrics = {
            "critique/initial_accuracy": c["initial_correct"] / c["initial"],
            "critique/refinement_accuracy": c["refinements_correct"] / c["refinements"],
            "critique/kept_refinement_accuracy": c["kept_correct"] / c["kept"],
            "critique/rescued_frac": c["rescued"] / c["prompts"],
            "critique/refinement_length_mean": c["refinement_tokens"] / c["refinements"],
            "critique/refinement_truncated_frac": c["refinements_truncated"] / c["refinements"],
        }
        if self.source == "model":
            metrics["critique/model_critiques"] = c.get("model_critiques", 0.0)
            metrics["critique/fallbacks"] = c.get("fallbacks", 0.0)
            metrics["critique/critic_errors"] = c.get("critic_errors", 0.0)
            metrics["critique/critic_s"] = c.get("critic_s", 0.0)
        return metrics


def _any_per_prompt(batch: RolloutBatch, prompts: int) -> torch.Tensor:
    """[prompts] bool: the prompt has at least one correct sample in `batch`."""
    hits = torch.zeros(prompts).index_add_(0, batch.prompt_index, batch.correct.float())
    return hits > 0
