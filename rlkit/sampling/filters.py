"""Group filters: which sampled groups a step trains on (DAPO dynamic sampling; docs/algorithms.md).

A filter is ``fn(batch, **options) -> keep [B] bool``, judged on the verifier's rewards before any
shaping; `rlkit.sampling.collect` resamples while too few prompts survive.
"""
from __future__ import annotations

import torch

from rlkit.algorithms import zero_variance_groups
from rlkit.batch import RolloutBatch
from rlkit.registry import Registry

GROUP_FILTERS: Registry = Registry("group filter", inputs=("batch",))


@GROUP_FILTERS.register("none")
def keep_all(batch: RolloutBatch) -> torch.Tensor:
    return torch.ones(len(batch), dtype=torch.bool)


@GROUP_FILTERS.register("zero_variance", needs_groups=True)
def drop_zero_variance(batch: RolloutBatch, *, tol: float = 1e-6) -> torch.Tensor:
    """Drops groups whose scorable rewards all lie within `tol`: they carry no group signal."""
    return ~zero_variance_groups(batch.rewards, batch.group_ids, batch.scorable, tol)
