"""Data-parallel gradient sum for the Learner (docs/distributed.md): each rank backpropagates its share of a
mini-batch un-normalised; before the optimizer step every trainable parameter's gradient is summed over ranks,
in flat buckets (one all-reduce per bucket instead of one per parameter). Sharded (FSDP2), backward's
reduce-scatter sums instead (rlkit.trainer.sharding)."""
from __future__ import annotations

from typing import Iterable

import torch

BUCKET_ELEMENTS = 2**25  # gradients are summed in flat buckets of at most this many elements (a larger one alone)


def sum_over_ranks(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Every parameter's gradient replaced by its sum over the `world_size` ranks (a missing one counts as 0).
    A collective: every rank calls it with the same parameters in the same order."""
    params = list(params)
    if world_size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    for i, p in enumerate(params):
        bucket.append(p.grad)
        if i == len(params) - 1 or sum(g.numel() for g in bucket) + params[i + 1].numel() > BUCKET_ELEMENTS:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            torch.distributed.all_reduce(flat)
            for g, summed in zip(bucket, flat.split([g.numel() for g in bucket])):
                g.copy_(summed.view_as(g))
            bucket = []
