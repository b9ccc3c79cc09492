"""Pure estimators over one prompt's n samples: unbiased pass@k and exact maj@k (docs/eval.md)."""
from __future__ import annotations

from math import comb, prod
from typing import Hashable, Sequence


def _check_k(n: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"n: need at least one sample, got n={n}. Fix: sample eval.n>=1 responses per prompt")
    if not 1 <= k <= n:
        raise ValueError(f"k: k={k} must be between 1 and n={n}. Fix: set eval.n>={k} or use a k <= eval.n")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of Chen et al. (2021) from `c` correct among `n` samples: 1 - C(n-c, k) / C(n, k).

    The probability that a uniformly drawn k-subset of the n samples holds at least one correct one,
    computed as the product 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms large binomials.
    """
    _check_k(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c: c={c} correct samples must be between 0 and n={n}. Fix: count correct samples of n")
    if n - c < k:
        return 1.0
    return 1.0 - prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def maj_at_k(labels: Sequence[Hashable | None], correct_label: Hashable | None, k: int) -> float:
    """Majority-vote accuracy of k samples, exact over every k-subset of the n samples (sample order kept).

    labels: [n] the answer class of each sample in sample order (samples with equal answers share a label);
        None for a sample without a vote (no answer, unscorable).
    correct_label: the label of the correct answers, or None when no sample is correct.
    Returns the fraction of the C(n, k) subsets whose vote elects `correct_label`. The winner is the label
    with most votes in the subset; a tie goes to the label whose first sample comes first among all n
    samples; a subset without a single vote elects nothing (wrong).

    Computed by counting, not enumerating: for each number x of correct votes, the other labels must get
    fewer than x votes (at most x when the correct label comes first), non-voters are free.
    """
    n = len(labels)
    _check_k(n, k)
    if correct_label is None:
        return 0.0
    first_seen: dict[Hashable, int] = {}
    counts: dict[Hashable, int] = {}
    for index, label in enumerate(labels):
        if label is not None:
            first_seen.setdefault(label, index)
            counts[label] = counts.get(label, 0) + 1
    if correct_label not in counts:
        raise ValueError(f"correct_label: {correct_label!r} is not among the labels. Fix: pass None when no "
                         f"sample is correct")
    silent = n - sum(counts.values())
    rivals = [(count, first_seen[label] < first_seen[correct_label]) for label, count in counts.items()
              if label != correct_label]
    winning = 0
    for x in range(1, min(k, counts[correct_label]) + 1):
        ways = [comb(silent, y) for y in range(k - x + 1)]  # ways[j]: subsets of the others with j samples
        for count, wins_ties in rivals:
            most = min(count, x - 1 if wins_ties else x, k - x)
            ways = _times(ways, [comb(count, y) for y in range(most + 1)], k - x)
        winning += comb(counts[correct_label], x) * ways[k - x]
    return winning / comb(n, k)


def _times(a: list[int], b: list[int], degree: int) -> list[int]:
    """Product of two polynomials (coefficient lists), truncated to `degree`."""
    out = [0] * (degree + 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b[: degree + 1 - i]):
                out[i + j] += ai * bj
    return out
