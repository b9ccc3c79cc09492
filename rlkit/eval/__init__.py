"""Held-out evaluation: pass@k / maj@k estimators, benchmarks, the `Evaluator` the trainer holds,
and `python -m rlkit.eval` (docs/eval.md)."""
from rlkit.eval.benchmarks import Benchmark, load_benchmark
from rlkit.eval.estimators import maj_at_k, pass_at_k
from rlkit.eval.evaluator import BenchmarkResult, EvalSettings, Evaluator, eval_settings, flat_metrics

__all__ = ["Benchmark", "BenchmarkResult", "EvalSettings", "Evaluator", "eval_settings", "flat_metrics",
           "load_benchmark", "maj_at_k", "pass_at_k"]
