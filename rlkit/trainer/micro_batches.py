"""How a rank's rows split into micro-batches: a fixed number of rows each, or as many as fit a token budget.

A micro-batch is a run of consecutive rows (the Learner sorts a share by length first, so similar lengths share
one). With a budget (trainer.micro_batch_tokens) memory is bounded by tokens, not rows, and short rows make
large micro-batches. Ranks may need different numbers under a budget; `split_to` splits a rank's micro-batches
further until it has as many as the rank that needs the most, since every rank must run the same forwards and
backwards. Any split gives the same step (the loss is normalised once per mini-batch).
"""
from __future__ import annotations


def micro_batch_sizes(tokens: list[int], *, rows: int, budget: int | None) -> list[int]:
    """Row counts of consecutive micro-batches over rows of `tokens` (prompt+response) tokens each, in order:
    `rows` rows each without a budget; with one, greedily as many rows as keep the sum within `budget`
    (a row longer than the budget alone). [] for no rows."""
    if budget is None:
        return [min(rows, len(tokens) - start) for start in range(0, len(tokens), rows)]
    sizes, used = [], 0
    for n in tokens:
        if sizes and used + n <= budget:
            sizes[-1], used = sizes[-1] + 1, used + n
        else:
            sizes, used = sizes + [1], n
    return sizes


def split_to(sizes: list[int], count: int) -> list[int]:
    """`sizes` with the micro-batch of most rows (the first such) halved, in place in the order, until there are
    `count` micro-batches (or every one holds a single row). A part of a micro-batch stays within its budget."""
    sizes = list(sizes)
    while len(sizes) < count and max(sizes, default=1) > 1:
        i = sizes.index(max(sizes))
        sizes[i : i + 1] = [sizes[i] - sizes[i] // 2, sizes[i] // 2]
    return sizes
