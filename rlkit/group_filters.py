"""Group filters: which sampled groups a step trains on (DAPO dynamic sampling, DESIGN.md §1).

A filter is fn(batch, *, tol) -> keep [B] bool; the trainer resamples while too few groups survive.
"""
from __future__ import annotations

import torch

from rlkit.algorithms import zero_variance_groups
from rlkit.batch import RolloutBatch
from rlkit.registry import Registry

GROUP_FILTERS: Registry = Registry("group filter")


@GROUP_FILTERS.register("none")
def keep_all(batch: RolloutBatch, *, tol: float) -> torch.Tensor:
    return torch.ones(len(batch), dtype=torch.bool)


@GROUP_FILTERS.register("zero_variance")
def drop_zero_variance(batch: RolloutBatch, *, tol: float) -> torch.Tensor:
    """Drops groups whose scorable rewards all lie within `tol`: they carry no GRPO signal."""
    return ~zero_variance_groups(batch.rewards, batch.group_ids, batch.scorable, tol)
