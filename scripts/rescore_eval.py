"""Score an evaluation's saved responses again with the current verifier, without sampling again.

    python scripts/rescore_eval.py runs/eval/NAME [runs/eval/OTHER ...] [--options '{"accept_unevaluated": true}']

Reads <dir>/eval.json (n, k, verifier) and <dir>/samples.jsonl, scores every response in-process with
`rlkit.reward.score_one`, rebuilds the votes and prints the metrics of `python -m rlkit.eval` per benchmark
next to the saved ones. Used when a verifier fix changes verdicts (docs/eval.md, docs/methods.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlkit.eval.evaluator import VerifierEquality, benchmark_metrics, vote_labels
from rlkit.reward import score_one


class InProcessScorer:
    """`score(responses, references) -> [Score]` with one verifier, for `VerifierEquality`."""

    def __init__(self, verifier: str, options: dict):
        self.verifier, self.options = verifier, options

    def score(self, responses: list[str], references: list[str]) -> list:
        return [score_one(self.verifier, r, g, self.options) for r, g in zip(responses, references)]


def rescore(eval_dir: Path, options: dict | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """{benchmark: {"saved": metrics, "rescored": metrics}} for one eval directory."""
    report = json.loads((eval_dir / "eval.json").read_text())
    settings = report["settings"]
    verifier = report["config"]["reward"]["verifier"]
    scorer = InProcessScorer(verifier["name"], {**(verifier.get("options") or {}), **(options or {})})
    records = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text().splitlines() if line]
    n, ks = settings["n"], settings["k"]
    out = {}
    for name in dict.fromkeys(r["benchmark"] for r in records):
        samples = [dict(r) for r in records if r["benchmark"] == name]
        scores = scorer.score([s["response"] for s in samples], [s["reference"] for s in samples])
        for s, score in zip(samples, scores):
            s.update(correct=score.reward is not None and score.correct, reward=score.reward, error=score.error,
                     extracted=score.extracted)
        rows = [samples[i:i + n] for i in range(0, len(samples), n)]
        same = VerifierEquality(scorer) if max(ks) > 1 else (lambda pairs: [False] * len(pairs))
        labels = vote_labels([[s["extracted"] if s["reward"] is not None else None for s in row] for row in rows],
                             [[s["correct"] for s in row] for row in rows], same)
        for s, label in zip(samples, (label for row in labels for label in row)):
            s["vote"] = label
        out[name] = {"saved": report["metrics"][name], "rescored": benchmark_metrics(samples, n, ks)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="eval output directories (eval.json, samples.jsonl)")
    parser.add_argument("--options", type=json.loads, default=None, help="verifier options to add, as JSON")
    args = parser.parse_args()
    for eval_dir in args.dirs:
        for name, both in rescore(eval_dir, args.options).items():
            keys = [k for k in both["rescored"] if k.startswith(("pass@", "maj@"))]
            saved = " ".join(f"{k}={both['saved'][k]:.3f}" for k in keys)
            new = " ".join(f"{k}={both['rescored'][k]:.3f}" for k in keys)
            print(f"{eval_dir} {name}: saved {saved} -> rescored {new}")


if __name__ == "__main__":
    main()
