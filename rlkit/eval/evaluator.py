"""`Evaluator`: sample every benchmark with a live engine, score with the run's verifier, report pass@k / maj@k.

The trainer holds one (its engine, weights already pushed) and calls `run()` every `trainer.eval_every`
steps; `python -m rlkit.eval` builds its own engine and writes the samples too (docs/eval.md).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from statistics import fmean
from typing import Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from rlkit.errors import ConfigError
from rlkit.eval.benchmarks import Benchmark, load_benchmark, resolve
from rlkit.eval.estimators import maj_at_k, pass_at_k
from rlkit.rollout import SamplingConfig

CORRECT = 0  # the vote label of every correct answer; other answers get labels 1, 2, ...
SCORE_METRICS = ("pass@", "maj@")  # metric names averaged into eval/overall/...


@dataclass(frozen=True)
class EvalSettings:
    """The validated `eval:` block. sampling.seed is the seed of a benchmark's first prompt."""

    benchmarks: tuple[str, ...]
    ks: tuple[int, ...]
    sampling: SamplingConfig
    batch_size: int
    block: dict  # the whole `eval:` block, resolved (suite, file, limit, ...)


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def eval_settings(cfg: DictConfig) -> EvalSettings:
    """Check `cfg.eval` once, before anything is loaded; every refusal names the key and the fix."""
    block = OmegaConf.to_container(cfg.eval, resolve=True)
    names, n, ks = block["benchmarks"], block["n"], block["k"]
    _require(isinstance(names, list) and len(names) > 0, "eval.benchmarks", f"expected a non-empty list, got {names!r}",
             "e.g. eval.benchmarks=[arithmetic,gsm8k]")
    _require(len(set(names)) == len(names), "eval.benchmarks", f"{names} names a benchmark twice", "list each once")
    for name in names:
        resolve(name, block["suite"], block["file"])  # an unknown name fails here, before anything loads
    _require(isinstance(n, int) and n >= 1, "eval.n", f"must be an integer >= 1, got {n!r}", "set e.g. eval.n=8")
    ks = [ks] if isinstance(ks, int) else ks
    _require(isinstance(ks, list) and len(ks) > 0 and all(isinstance(k, int) and k >= 1 for k in ks), "eval.k",
             f"expected a list of integers >= 1, got {block['k']!r}", "e.g. eval.k=[1,4,8]")
    _require(max(ks) <= n, "eval.k", f"k={max(ks)} is larger than eval.n={n}: pass@k needs at least k samples",
             f"set eval.n>={max(ks)} or drop the larger k from eval.k")
    temperature = block["temperature"]
    _require(temperature >= 0, "eval.temperature", f"must be >= 0, got {temperature}", "0 (greedy) or e.g. 1.0")
    _require(temperature > 0 or n == 1, "eval.n", f"greedy decoding (eval.temperature=0) gives {n} identical samples",
             "set eval.n=1, or eval.temperature>0 to sample")
    _require(block["limit"] is None or block["limit"] >= 1, "eval.limit", f"must be >= 1 or null, got {block['limit']}",
             "set e.g. eval.limit=200")
    _require(block["batch_size"] >= 1, "eval.batch_size", f"must be >= 1, got {block['batch_size']}", "set e.g. 64")
    max_tokens = block["max_tokens"] or cfg.rollout.max_tokens
    _require(max_tokens >= 1, "eval.max_tokens", f"must be >= 1, got {max_tokens}", "set e.g. 512")
    sampling = SamplingConfig(n=n, temperature=float(temperature), top_p=block["top_p"], top_k=block["top_k"],
                              max_tokens=max_tokens, seed=block["seed"])
    return EvalSettings(tuple(names), tuple(sorted(set(ks))), sampling, block["batch_size"], block)


class VerifierEquality:
    """Answer equality as the verifier sees it: `a` equals `b` when the response `\\boxed{a}` scores correct
    against the reference `b`. Batched and cached; an unscorable comparison counts as different."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.cache: dict[tuple[str, str], bool] = {}

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        todo = [pair for pair in dict.fromkeys(pairs) if pair not in self.cache]
        if todo:
            scores = self.scorer.score([f"\\boxed{{{a}}}" for a, _ in todo], [b for _, b in todo])
            self.cache.update((pair, s.reward is not None and s.correct) for pair, s in zip(todo, scores))
        return [self.cache[pair] for pair in pairs]


def vote_labels(
    answers: Sequence[Sequence[str | None]],
    correct: Sequence[Sequence[bool]],
    same: Callable[[Sequence[tuple[str, str]]], list[bool]],
) -> list[list[int | None]]:
    """The vote label of each sample, per prompt: CORRECT for correct samples, None for samples without a
    usable answer, else the class of its answer among the prompt's other wrong answers.

    answers / correct: [P][n]. same(pairs) -> [len(pairs)]: whether each (candidate, representative) pair is
    equal. Classes are formed in first-appearance order: an answer joins the first earlier class whose first
    answer (its representative) it equals, else it starts a class. Equal strings share a class without asking
    `same`; the calls are batched over prompts, one round per class.
    """
    pending = [list(dict.fromkeys(a for a, ok in zip(row, oks) if a is not None and not ok))
               for row, oks in zip(answers, correct)]
    classes: list[dict[str, int]] = [{} for _ in answers]
    next_label = [CORRECT + 1] * len(answers)
    while any(pending):
        asks = []
        for p, strings in enumerate(pending):
            if strings:
                classes[p][strings[0]] = next_label[p]
                asks += [(p, s, strings[0]) for s in strings[1:]]
        verdicts = same([(s, rep) for _, s, rep in asks])
        for (p, s, rep), equal in zip(asks, verdicts):
            if equal:
                classes[p][s] = classes[p][rep]
        for p, strings in enumerate(pending):
            if strings:
                next_label[p] += 1
                pending[p] = [s for s in strings[1:] if s not in classes[p]]
    return [[CORRECT if ok else (classes[p][a] if a is not None else None) for a, ok in zip(row, oks)]
            for p, (row, oks) in enumerate(zip(answers, correct))]


def benchmark_metrics(samples: Sequence[Mapping], n: int, ks: Sequence[int]) -> dict[str, float]:
    """Metrics of one benchmark from its sample records, n consecutive records per prompt.

    Each record has correct (bool), vote (label or None), tokens (int), finish_reason, reward (None:
    unscorable) and error. pass@1 is the mean over all samples; pass@k (Chen et al.) and maj@k (exact over
    k-subsets, see `maj_at_k`) are means over prompts. An unscorable sample counts as not correct and casts
    no vote; `unscorable` counts them.
    """
    prompts = [samples[i:i + n] for i in range(0, len(samples), n)]
    metrics = {}
    for k in sorted({1, *ks}):
        metrics[f"pass@{k}"] = fmean(pass_at_k(n, sum(s["correct"] for s in group), k) for group in prompts)
    for k in ks:
        metrics[f"maj@{k}"] = fmean(
            maj_at_k([s["vote"] for s in group], CORRECT if any(s["correct"] for s in group) else None, k)
            for group in prompts)
    metrics.update({
        "length_mean": fmean(s["tokens"] for s in samples),
        "truncated_frac": fmean(s["finish_reason"] == "length" for s in samples),
        "no_answer_frac": fmean(s["error"] == "no_answer" for s in samples),
        "unscorable": float(sum(s["reward"] is None for s in samples)),
        "prompts": float(len(prompts)),
    })
    return metrics


@dataclass
class BenchmarkResult:
    """metrics: name -> value (pass@k, maj@k, length_mean, ..., prompts_per_s); samples: one record per response."""

    name: str
    metrics: dict[str, float]
    samples: list[dict]


class Evaluator:
    """Evaluates `eval.benchmarks` with an engine and a scorer it does not own (it never closes them).

    cfg: a composed config with an `eval:` block and `rollout.max_tokens`; tokenizer builds the prompts.
    Prompts are loaded once, here (pass `benchmarks` to reuse ones already loaded).
    """

    def __init__(self, cfg: DictConfig, tokenizer, engine, scorer, *, benchmarks: list[Benchmark] | None = None,
                 progress: bool = False):
        self.settings = eval_settings(cfg)
        self.tokenizer, self.engine, self.scorer, self.progress = tokenizer, engine, scorer, progress
        self.benchmarks = benchmarks if benchmarks is not None else load_benchmarks(self.settings, tokenizer)

    def run(self) -> dict[str, float]:
        """Metrics keyed eval/<benchmark>/<metric> (and eval/overall/<metric> over several benchmarks)."""
        return flat_metrics(self.evaluate())

    def evaluate(self) -> list[BenchmarkResult]:
        from tqdm.auto import tqdm

        total = sum(len(b.prompts) for b in self.benchmarks)
        with tqdm(total=total, disable=not self.progress, desc="eval", unit="prompt") as bar:
            return [self._evaluate_one(benchmark, bar) for benchmark in self.benchmarks]

    def _evaluate_one(self, benchmark: Benchmark, bar) -> BenchmarkResult:
        s = self.settings
        n, start = s.sampling.n, time.perf_counter()
        completions = []
        for lo in range(0, len(benchmark.prompts), s.batch_size):
            chunk = benchmark.prompts[lo:lo + s.batch_size]
            seed = None if s.sampling.seed is None else s.sampling.seed + lo * n
            out = self.engine.generate(chunk, dataclasses.replace(s.sampling, seed=seed))
            if [c.prompt_index for c in out] != [i for i in range(len(chunk)) for _ in range(n)]:
                raise RuntimeError(f"the rollout engine returned {len(out)} completions out of prompt order; "
                                   f"expected {n} per prompt for {len(chunk)} prompts, grouped in prompt order")
            completions += out
            bar.update(len(chunk))
        texts = self.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
        references = [row["answer"] for row in benchmark.rows for _ in range(n)]
        scores = self.scorer.score(texts, references)
        answers = [[sc.extracted if sc.reward is not None else None for sc in scores[i:i + n]]
                   for i in range(0, len(scores), n)]
        correct = [[sc.reward is not None and sc.correct for sc in scores[i:i + n]] for i in range(0, len(scores), n)]
        # One vote per sample needs classes of equal answers only when a vote has several voters (k > 1).
        same = VerifierEquality(self.scorer) if max(s.ks) > 1 else (lambda pairs: [False] * len(pairs))
        votes = [label for row in vote_labels(answers, correct, same) for label in row]
        samples = [
            {"benchmark": benchmark.name, "prompt_index": i // n, "sample": i % n,
             "row": benchmark.rows[i // n]["meta"].get("index"), "prompt": benchmark.texts[i // n],
             "reference": references[i], "response": texts[i], "extracted": sc.extracted,
             "correct": sc.reward is not None and sc.correct, "reward": sc.reward, "error": sc.error,
             "vote": votes[i], "tokens": len(c.token_ids), "finish_reason": c.finish_reason}
            for i, (c, sc) in enumerate(zip(completions, scores))
        ]
        metrics = benchmark_metrics(samples, n, s.ks)
        seconds = time.perf_counter() - start
        metrics.update(seconds=seconds, prompts_per_s=len(benchmark.prompts) / seconds)
        return BenchmarkResult(benchmark.name, metrics, samples)


def load_benchmarks(settings: EvalSettings, tokenizer) -> list[Benchmark]:
    """Every benchmark of `eval.benchmarks`, rows and prompt ids loaded (ConfigError naming the key on failure)."""
    return [load_benchmark(name, settings.block, tokenizer) for name in settings.benchmarks]


def flat_metrics(results: Sequence[BenchmarkResult]) -> dict[str, float]:
    """eval/<benchmark>/<metric> for each result, plus eval/overall/<pass@k|maj@k> (the mean over benchmarks)
    when there are several."""
    flat = {f"eval/{r.name}/{key}": value for r in results for key, value in r.metrics.items()}
    if len(results) > 1:
        for key in results[0].metrics:
            if key.startswith(SCORE_METRICS):
                flat[f"eval/overall/{key}"] = fmean(r.metrics[key] for r in results)
    return flat


def overall(results: Sequence[BenchmarkResult]) -> dict[str, float]:
    """The eval/overall metrics of `flat_metrics`, keyed by metric name."""
    prefix = "eval/overall/"
    return {key[len(prefix):]: value for key, value in flat_metrics(results).items() if key.startswith(prefix)}
