"""Group bookkeeping shared by the estimators, and the zero-variance test of DAPO dynamic sampling.

Shapes: B = number of samples in the batch. Group ids are arbitrary long values
(not necessarily contiguous or sorted); unscorable samples (``scorable[i]`` False)
are left out of every group statistic (docs/algorithms.md, "rlkit decisions").
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_group_inputs(rewards: Tensor, group_ids: Tensor, scorable: Tensor | None) -> Tensor:
    """Validate rewards [B], group_ids [B] and scorable [B] (or None); return scorable as bool [B]."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids must have the shape of rewards {tuple(rewards.shape)}, got {tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex():
        raise ValueError(f"group_ids must be an integer tensor (torch.long), got {group_ids.dtype}")
    if scorable is None:
        scorable = torch.ones_like(rewards, dtype=torch.bool)
    elif scorable.shape != rewards.shape or scorable.dtype != torch.bool:
        raise ValueError(
            f"scorable must be a bool tensor of shape {tuple(rewards.shape)}, "
            f"got {scorable.dtype} {tuple(scorable.shape)}"
        )
    if not bool(torch.isfinite(rewards[scorable]).all()):
        raise ValueError("rewards of scorable samples must be finite; mark a failed score unscorable instead")
    return scorable


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary group ids [B] to dense indices: (inverse [B] long in [0, G), G)."""
    unique, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, unique.numel()


def group_range(rewards: Tensor, inverse: Tensor, num_groups: int, scorable: Tensor) -> Tensor:
    """Per-group max - min of the scorable rewards, [G] float64; -inf for a group with no scorable sample."""
    r = rewards.to(torch.float64)
    lo = torch.full((num_groups,), float("inf"), dtype=torch.float64, device=r.device)
    hi = torch.full((num_groups,), float("-inf"), dtype=torch.float64, device=r.device)
    lo = lo.scatter_reduce(0, inverse, torch.where(scorable, r, float("inf")), reduce="amin")
    hi = hi.scatter_reduce(0, inverse, torch.where(scorable, r, float("-inf")), reduce="amax")
    return hi - lo


def zero_variance_groups(
    rewards: Tensor, group_ids: Tensor, scorable: Tensor | None = None, tol: float = 1e-6
) -> Tensor:
    """True for every sample whose group carries no learning signal. [B] -> bool [B].

    A group is zero-variance when its scorable rewards span ``max - min <= tol``
    (a tolerance, never exact float equality), or when it holds fewer than 2
    scorable samples. Unscorable samples get their group's flag too.
    """
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    scorable = check_group_inputs(rewards, group_ids, scorable)
    inverse, num_groups = group_index(group_ids)
    # One scorable sample spans 0 and none spans -inf, so both pass the test below.
    flat = group_range(rewards, inverse, num_groups, scorable) <= tol
    return flat[inverse]


SINGLETON_MODES = ("zero", "reward")


class GroupStats:
    """Per-sample views of the scorable group statistics: counts n_i, sums S_i, rewards r (0 if unscorable)."""

    def __init__(self, rewards: Tensor, group_ids: Tensor, scorable: Tensor, tol: float):
        inverse, num_groups = group_index(group_ids)
        self.scorable = scorable
        self.inverse = inverse
        self.num_groups = num_groups
        self.r = torch.where(scorable, rewards.to(torch.float64), 0.0)
        self.n = self.per_sample(scorable.to(torch.float64))
        self.total = self.per_sample(self.r)
        self.flat = (group_range(rewards, inverse, num_groups, scorable) <= tol)[inverse]

    def per_sample(self, values: Tensor) -> Tensor:
        """Sum `values` [B] within each group and hand every sample its group's sum [B]."""
        sums = torch.zeros(self.num_groups, dtype=values.dtype, device=values.device)
        return sums.index_add(0, self.inverse, values)[self.inverse]

    def finish(self, advantage: Tensor, singleton: str, response_mask: Tensor) -> Tensor:
        """Apply the shared rules to per-sample advantages [B] and spread them over the tokens -> [B,T]."""
        advantage = torch.where(self.flat, 0.0, advantage)
        if singleton == "reward":
            advantage = torch.where(self.n == 1, self.r, advantage)
        advantage = torch.where(self.scorable, advantage, 0.0)
        return advantage.to(torch.float32)[:, None] * response_mask.to(torch.float32)


def check_estimator_options(rewards: Tensor, response_mask: Tensor, singleton: str, tol: float) -> None:
    """The options every group estimator shares: response_mask [B,T], singleton mode, flat-group tolerance."""
    if response_mask.dim() != 2 or response_mask.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"response_mask must be [B,T] with B={rewards.shape[0]} (len(rewards)), got {tuple(response_mask.shape)}"
        )
    if singleton not in SINGLETON_MODES:
        raise ValueError(f"singleton must be one of {SINGLETON_MODES}, got {singleton!r}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
