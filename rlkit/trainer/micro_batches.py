"""How a mini-batch's rows are dealt to ranks, and how a rank's rows split into micro-batches: as many rows as
fit a token budget (trainer.micro_batch_tokens) and a row cap (trainer.micro_batch_size), each where set.

A micro-batch is a run of consecutive rows (`rank_share` sorts a share by length first, so similar lengths share
one). With a budget (trainer.micro_batch_tokens) memory is bounded by tokens, not rows, and short rows make
large micro-batches. Ranks may need different numbers under a budget; `split_to` splits a rank's micro-batches
further until it has as many as the rank that needs the most, since every rank must run the same forwards and
backwards. Any split gives the same step (the loss is normalised once per mini-batch).
"""
from __future__ import annotations

import torch

from rlkit.ranks import Ranks
from rlkit.trainer.shared_prompt import row_order


def rank_share(prompt_ids: list[list[int]], lengths: torch.Tensor, mini: torch.Tensor, ranks: Ranks, *,
               by_prompt: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of a mini-batch `mini` [m] (indices into the batch; prompt_ids [B], lengths [B]: response
    tokens) and whether each is live [s] (0: padding that carries no loss).

    Rows are sorted by prompt+response length (similar lengths share a micro-batch; `by_prompt`, for the
    shared-prompt forward: rows of one prompt stay adjacent) and dealt round-robin, so ranks get similar token
    counts; every rank gets ceil(m / world_size) rows, a short share padded with copies.
    """
    prompts = [prompt_ids[i] for i in mini]
    total = torch.tensor([len(p) for p in prompts], dtype=torch.long) + lengths[mini]
    mini = mini[row_order(prompts, total, by_prompt=by_prompt)]
    mine = mini[ranks.rank :: ranks.world_size]
    pad = -(-len(mini) // ranks.world_size) - len(mine)
    live = torch.cat([torch.ones(len(mine)), torch.zeros(pad)])
    return torch.cat([mine, mini[:pad]]), live


def row_tokens(prompt_ids: list[list[int]], lengths: torch.Tensor, rows: torch.Tensor) -> list[int]:
    """Prompt+response tokens the forward reads of each of `rows` [s] (lengths [B]: response tokens)."""
    return [len(prompt_ids[i]) + int(lengths[i]) for i in rows]


def micro_batch_sizes(tokens: list[int], *, rows: int | None, budget: int | None) -> list[int]:
    """Row counts of consecutive micro-batches over rows of `tokens` (prompt+response) tokens each, in order:
    greedily as many rows as keep both caps, at most `rows` rows and at most `budget` tokens (None: no such cap;
    a row longer than the budget alone). [] for no rows."""
    sizes, used = [], 0
    for n in tokens:
        if sizes and (rows is None or sizes[-1] < rows) and (budget is None or used + n <= budget):
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
