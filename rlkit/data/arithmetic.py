"""Procedural arithmetic tasks: unlimited, exactly checkable, and easy enough for a 135M model to learn on CPU."""
from __future__ import annotations

import random
import zlib

_OPS = "+-*"
# One problem in this many goes to the test split, decided by a hash of the question text,
# so train and test never share a problem whatever the seeds and sizes.
_TEST_BUCKETS = 10


def _split_of(question: str) -> str:
    return "test" if zlib.crc32(question.encode()) % _TEST_BUCKETS == 0 else "train"


def _evaluate(operands: list[int], ops: list[str]) -> int:
    """Standard precedence: `*` binds tighter than `+`/`-`, which go left to right."""
    terms = [operands[0]]
    signs = [1]
    for op, value in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def load_arithmetic(
    n: int,
    *,
    seed: int,
    min_value: int = 0,
    max_value: int = 99,
    terms: int = 2,
    ops: str = "+-",
    split: str = "train",
) -> list[dict]:
    """`n` rows like {"question": "What is 37 - 52?", "answer": "-15", "meta": {"operands", "ops", "expression"}}.

    Deterministic in (seed, options, split). Operands are uniform in [min_value, max_value], operators
    uniform over `ops` (a subset of "+-*"). The "train" and "test" splits are disjoint: each problem
    belongs to one split by a hash of its text. Problems may repeat within a split.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if terms < 2:
        raise ValueError(f"terms must be >= 2, got {terms}")
    if min_value > max_value:
        raise ValueError(f"min_value ({min_value}) must be <= max_value ({max_value})")
    if not ops or any(op not in _OPS for op in ops):
        raise ValueError(f"ops must be a non-empty string of characters from {_OPS!r}, got {ops!r}")
    if split not in ("train", "test"):
        raise ValueError(f"arithmetic split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"rlkit-arithmetic:{seed}")
    rows: list[dict] = []
    max_draws = 100 * n + 1000
    draws = 0
    while len(rows) < n:
        if draws == max_draws:
            raise ValueError(
                f"drew {draws} problems but found only {len(rows)} of {n} for split {split!r}; "
                f"the problem space is too small: widen min_value/max_value or add terms/ops"
            )
        draws += 1
        operands = [rng.randint(min_value, max_value) for _ in range(terms)]
        chosen = [rng.choice(ops) for _ in range(terms - 1)]
        expression = " ".join([str(operands[0])] + [f"{op} {v}" for op, v in zip(chosen, operands[1:])])
        question = f"What is {expression}?"
        if _split_of(question) != split:
            continue
        rows.append(
            {
                "question": question,
                "answer": str(_evaluate(operands, chosen)),
                "meta": {"operands": operands, "ops": chosen, "expression": expression},
            }
        )
    return rows
