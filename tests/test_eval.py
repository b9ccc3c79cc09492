"""Evaluation: pass@k / maj@k against hand values and enumeration, vote classes, benchmarks, settings, the CLI."""
import itertools
import json
import random
import subprocess
import sys
from math import comb

import pytest

from rlkit.config import ConfigError
from rlkit.eval import maj_at_k, pass_at_k
from rlkit.eval.benchmarks import load_benchmark, subset
from rlkit.eval.evaluator import CORRECT, Evaluator, VerifierEquality, benchmark_metrics, eval_settings, vote_labels
from rlkit.eval.job import compose, resolve_model_path, run_job


# ---------------------------------------------------------------- estimators

@pytest.mark.parametrize("n, c, k, expected", [
    (4, 1, 1, 0.25), (4, 1, 2, 0.5), (4, 1, 4, 1.0), (5, 2, 3, 0.9), (5, 0, 3, 0.0), (5, 5, 1, 1.0), (1, 1, 1, 1.0),
])
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_enumeration_over_k_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            correct = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(correct, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    # C(1000, 500) overflows a float; the product form does not.
    assert pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(1000, 10, 1) == pytest.approx(0.01, abs=1e-12)


@pytest.mark.parametrize("n, c, k, message", [(4, 1, 8, "eval.n>=8"), (4, 5, 1, "c=5"), (4, 1, 0, "k=0")])
def test_pass_at_k_refuses_impossible_arguments(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def majority_by_enumeration(labels, correct_label, k):
    """maj@k by its definition: the share of k-subsets whose vote (ties: first seen among all n) is correct."""
    first = {}
    for i, label in enumerate(labels):
        if label is not None:
            first.setdefault(label, i)
    wins = 0
    for chosen in itertools.combinations(range(len(labels)), k):
        votes = {}
        for i in chosen:
            if labels[i] is not None:
                votes[labels[i]] = votes.get(labels[i], 0) + 1
        winner = min(votes, key=lambda label: (-votes[label], first[label])) if votes else None
        wins += winner is not None and winner == correct_label
    return wins / comb(len(labels), k)


def test_maj_at_k_equals_enumeration_on_random_votes():
    rng = random.Random(0)
    for _ in range(1500):
        n = rng.randint(1, 9)
        labels = [rng.choice([None, 0, 1, 2, 3]) for _ in range(n)]
        correct_label = 0 if 0 in labels else None
        k = rng.randint(1, n)
        assert maj_at_k(labels, correct_label, k) == pytest.approx(majority_by_enumeration(labels, correct_label, k),
                                                                  abs=1e-12), (labels, k)


@pytest.mark.parametrize("labels, correct_label, k, expected", [
    ([1, 2, 1, None], None, 2, 0.0),  # c = 0: no subset can elect the correct answer
    ([0, 0, 0], 0, 2, 1.0),  # c = n
    ([0, 1, 1], 0, 3, 0.0),  # k = n: the full vote, 1 beats 0 two to one
    ([0, 0, 1], 0, 3, 1.0),
    ([1, 0], 0, 2, 0.0),  # a tie goes to the answer seen first: 1
    ([0, 1], 0, 2, 1.0),
    ([0, 1, 1, 0], 0, 4, 1.0),  # 2-2 tie, 0 came first
    ([None, None, 0], 0, 2, 2 / 3),  # unscorable / unanswered samples cast no vote; {None, None} elects nothing
    ([None, None, 0], 0, 3, 1.0),
    ([0, 1, 2, 3], 0, 1, 0.25),  # maj@1 is pass@1
])
def test_maj_at_k_edge_cases(labels, correct_label, k, expected):
    assert maj_at_k(labels, correct_label, k) == pytest.approx(expected, abs=1e-12)


def test_maj_at_k_refuses_k_above_n_and_an_absent_correct_label():
    with pytest.raises(ValueError, match="eval.n>=3"):
        maj_at_k([0, 1], 0, 3)
    with pytest.raises(ValueError, match="correct_label"):
        maj_at_k([1, 2], 0, 1)


# ---------------------------------------------------------------- votes through the verifier

def test_vote_labels_groups_answers_in_first_appearance_order_with_batched_rounds():
    calls = []

    def same(pairs):  # numeric equality, as a verifier would see "2" and "2.0"
        calls.append(list(pairs))
        return [float(a) == float(b) for a, b in pairs]

    answers = [["3", "2.0", None, "2", "3.0", "5"], ["7", "7", "7.0"]]
    correct = [[False, False, False, False, False, True], [False, False, False]]
    labels = vote_labels(answers, correct, same)
    assert labels == [[1, 2, None, 2, 1, CORRECT], [1, 1, 1]]
    # round 1: every other answer against the first one; round 2: what is left against the next class
    assert calls == [[("2.0", "3"), ("2", "3"), ("3.0", "3"), ("7.0", "7")], [("2", "2.0")]]


def test_verifier_equality_uses_the_math_verifier_and_caches():
    from rlkit.reward.pool import VerifierPool

    pool = VerifierPool("math", num_workers=0)
    same = VerifierEquality(pool)
    try:
        assert same([("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("2", "3")]) == [True, True, False]
        assert len(same.cache) == 3
        assert same([("1/2", "0.5")]) == [True] and len(same.cache) == 3
    finally:
        pool.close()


def record(correct, vote, tokens=4, finish="stop", reward=0.0, error=None):
    return {"correct": correct, "vote": vote, "tokens": tokens, "finish_reason": finish,
            "reward": 1.0 if correct else reward, "error": error}


def test_benchmark_metrics_from_records():
    samples = [  # prompt 0: 1 of 2 correct, a 1-1 tie won by the wrong answer; prompt 1: none correct
        record(False, 1, tokens=2), record(True, CORRECT, tokens=6, finish="length"),
        record(False, None, reward=None, error="timeout"), record(False, None, error="no_answer"),
    ]
    metrics = benchmark_metrics(samples, n=2, ks=[2])
    assert metrics == pytest.approx({
        "pass@1": 0.25, "pass@2": 0.5, "maj@2": 0.0, "length_mean": 4.0, "truncated_frac": 0.25,
        "no_answer_frac": 0.25, "unscorable": 1.0, "prompts": 2.0,
    })


# ---------------------------------------------------------------- settings and benchmarks

@pytest.mark.parametrize("overrides, message", [
    (["eval.n=4", "eval.k=[1,8]", "eval.temperature=1"], "eval.k: k=8 is larger than eval.n=4.*Fix: set eval.n>=8"),
    (["eval.n=4"], "eval.n: greedy .* Fix: set eval.n=1"),
    (["eval.benchmarks=[gsm8k,gsm8k]"], "eval.benchmarks: .* twice"),
    (["eval.temperature=-1"], "eval.temperature"),
    (["eval.limit=0"], "eval.limit"),
])
def test_eval_settings_refuse_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        eval_settings(compose(overrides))


def test_unknown_benchmark_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown benchmark 'gsm9k'; known: arithmetic, gsm8k, math, math500. Fix"):
        eval_settings(compose(["eval.benchmarks=[arithmetic,gsm9k]"]))


def test_missing_answer_column_names_the_columns_present(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"q": "What is 1 + 1?", "solution": "2"}) + "\n")
    block = eval_settings(compose([f"eval.benchmarks=[{path}]", "eval.file.prompt_column=q"])).block
    with pytest.raises(ConfigError, match=r"^eval.file.answer_column: .*no column 'answer'.*q, solution"):
        load_benchmark(str(path), block, tokenizer=None)


def test_file_benchmark_prompts_are_built_like_training(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from rlkit.data import build_prompt

    path = tmp_path / "my-set.jsonl"
    path.write_text("".join(json.dumps({"q": f"What is {i} + 1?", "a": i + 1}) + "\n" for i in range(5)))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = compose([f"eval.benchmarks=[{path}]", "eval.file.prompt_column=q", "eval.file.answer_column=a",
                   "eval.file.system_prompt=Be brief.", "eval.file.template='Q: {question}'"])
    bench = load_benchmark(str(path), eval_settings(cfg).block, tokenizer)
    assert bench.name == "my-set" and bench.key == "eval.file"
    assert [row["answer"] for row in bench.rows] == ["1", "2", "3", "4", "5"]
    assert bench.texts[0] == "Q: What is 0 + 1?"
    assert bench.prompts[0] == build_prompt(tokenizer, "What is 0 + 1?", template="Q: {question}",
                                            system_prompt="Be brief.")


def test_builtin_benchmarks_load_their_test_splits(tiny_model_dir):
    from transformers import AutoTokenizer

    from rlkit.data import load_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    block = eval_settings(compose(["eval.limit=3", "eval.shuffle=false"])).block
    for name, first in [("gsm8k", "18"), ("math500", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("math", "2")]:
        bench = load_benchmark(name, block, tokenizer)
        assert len(bench.prompts) == 3 and bench.rows[0]["answer"] == first, name
    block = eval_settings(compose()).block
    arithmetic = load_benchmark("arithmetic", block, tokenizer)
    assert len(arithmetic.rows) == 200 and arithmetic.rows == load_benchmark("arithmetic", block, tokenizer).rows
    train = load_rows("arithmetic", split="train", limit=4096, seed=0, options=block["suite"]["arithmetic"]["options"])
    assert not {r["question"] for r in arithmetic.rows} & {r["question"] for r in train}


def test_limit_takes_a_fixed_seeded_subset_in_source_order():
    rows = list(range(100))
    first = subset(rows, 10, shuffle=True, seed=0)
    assert first == subset(rows, 10, shuffle=True, seed=0) and first == sorted(first)
    assert first != subset(rows, 10, shuffle=True, seed=1)
    assert subset(rows, 10, shuffle=False, seed=0) == rows[:10]
    assert subset(rows, 500, shuffle=True, seed=0) == rows


def test_model_path_accepts_a_folder_a_run_and_a_checkpoint(tmp_path):
    for folder in ("hf", "run/final", "run/checkpoints/step_2/model"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "hf")) == str(tmp_path / "hf")
    assert resolve_model_path(str(tmp_path / "run")) == str(tmp_path / "run" / "final")
    assert resolve_model_path(str(tmp_path / "run" / "final")) == str(tmp_path / "run" / "final")
    step = tmp_path / "run" / "checkpoints" / "step_2"
    assert resolve_model_path(str(step)) == str(step / "model")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ConfigError, match="model.path: .* does not exist. Fix"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="holds no config.json"):
        resolve_model_path(str(tmp_path / "run" / "checkpoints"))


# ---------------------------------------------------------------- the evaluator and the command

def test_evaluator_greedy_is_repeatable_and_leaves_the_engine_open(tiny_model_dir):
    from transformers import AutoTokenizer

    from rlkit.reward.pool import VerifierPool
    from rlkit.rollout.hf_engine import HFEngine

    cfg = compose([f"model.path={tiny_model_dir}", "eval.limit=6", "eval.max_tokens=8", "eval.benchmarks=[arithmetic]"])
    engine, pool = HFEngine(str(tiny_model_dir)), VerifierPool("math", num_workers=0)
    try:
        evaluator = Evaluator(cfg, AutoTokenizer.from_pretrained(tiny_model_dir), engine, pool)
        first, second = evaluator.run(), evaluator.run()
        assert engine.model is not None  # the trainer's engine stays usable
    finally:
        pool.close()
    assert {"eval/arithmetic/pass@1", "eval/arithmetic/maj@1", "eval/arithmetic/length_mean",
            "eval/arithmetic/truncated_frac", "eval/arithmetic/unscorable"} <= first.keys()
    assert first["eval/arithmetic/prompts"] == 6 and 0 < first["eval/arithmetic/length_mean"] <= 8
    timing = ("seconds", "prompts_per_s")
    assert {k: v for k, v in first.items() if not k.endswith(timing)} == \
        {k: v for k, v in second.items() if not k.endswith(timing)}


def test_cli_refuses_an_unknown_benchmark_naming_the_known_ones():
    result = subprocess.run([sys.executable, "-m", "rlkit.eval", "eval.benchmarks=[gsm9k]"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "rlkit: bad config: eval.benchmarks: unknown benchmark 'gsm9k'; known: arithmetic, gsm8k, math, math500" \
        in result.stderr


def test_eval_end_to_end_with_vllm_matches_its_samples(tmp_path, tiny_model_dir):
    bench = tmp_path / "digits.jsonl"
    bench.write_text("".join(json.dumps({"q": f"What is {i % 9} + 1?", "a": str(i % 9 + 1)}) + "\n" for i in range(12)))
    out = tmp_path / "out"
    cfg = compose([f"model.path={tiny_model_dir}", "rollout.engine.options.max_model_len=256", "rollout.max_tokens=16",
                   "reward.num_workers=1", "eval.n=4", "eval.k=[1,2,4]", "eval.temperature=1.0", "eval.limit=8",
                   f"eval.benchmarks=[arithmetic,{bench}]", "eval.file.prompt_column=q", "eval.file.answer_column=a",
                   f"eval.output_dir={out}"])
    run_job(cfg, progress=False)
    summary = json.loads((out / "eval.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert summary["settings"]["n"] == 4 and summary["settings"]["k"] == [1, 2, 4]
    assert {"torch", "transformers", "math-verify"} <= summary["versions"].keys()
    assert set(summary["metrics"]) == {"arithmetic", "digits"}
    assert len(samples) == 2 * 8 * 4
    for name, metrics in summary["metrics"].items():
        mine = [s for s in samples if s["benchmark"] == name]
        groups = [mine[i:i + 4] for i in range(0, len(mine), 4)]
        assert [g[0]["prompt_index"] for g in groups] == list(range(8)) and metrics["prompts"] == 8
        assert metrics["pass@1"] == pytest.approx(sum(s["correct"] for s in mine) / len(mine))
        assert metrics["pass@4"] == pytest.approx(sum(any(s["correct"] for s in g) for g in groups) / 8)
        for k in (2, 4):
            expected = sum(majority_by_enumeration([s["vote"] for s in g], CORRECT, k) for g in groups) / 8
            assert metrics[f"maj@{k}"] == pytest.approx(expected), (name, k)
        assert metrics["length_mean"] == pytest.approx(sum(s["tokens"] for s in mine) / len(mine))
        assert metrics["truncated_frac"] == pytest.approx(sum(s["finish_reason"] == "length" for s in mine) / len(mine))
        assert all(0 < s["tokens"] <= 16 and (s["vote"] == CORRECT) == s["correct"] for s in mine)
    assert summary["overall"]["pass@1"] == pytest.approx(
        (summary["metrics"]["arithmetic"]["pass@1"] + summary["metrics"]["digits"]["pass@1"]) / 2)
