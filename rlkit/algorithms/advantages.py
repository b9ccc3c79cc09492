"""Group advantage estimators (docs/algorithms.md, "Advantage estimators").

Every estimator has one signature, registered in ``ADVANTAGES``:
``fn(rewards [B] float, group_ids [B] long, response_mask [B,T], *, scorable=None [B] bool, **options)
-> advantages [B,T] float32``; method tensors a sampler adds (``RolloutBatch.estimator_inputs``,
e.g. FR3E's state ids [B]) arrive as further keywords with ``adv[i,t] = A_i * mask[i,t]``.

Shared rules (docs/algorithms.md, "rlkit decisions"):
- unscorable samples are left out of every group statistic and get A = 0;
- a group with exactly one scorable sample gets A = 0 (``singleton="zero"``) or A = r
  (``singleton="reward"``, verl parity);
- a group whose scorable rewards span ``max - min <= tol`` gets A = 0 (tolerance, not float equality).
Statistics are computed in float64 by scatter over dense group indices, no loop over samples.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlkit.algorithms.groups import GroupStats, check_estimator_options, check_group_inputs
from rlkit.registry import Registry

ADVANTAGES: Registry = Registry("advantage estimator", inputs=("rewards", "group_ids", "response_mask", "scorable"))

@ADVANTAGES.register("grpo", needs_groups=True)
def grpo(
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    *,
    scorable: Tensor | None = None,
    eps: float = 1e-6,
    norm_by_std: bool = True,
    singleton: str = "zero",
    tol: float = 1e-6,
) -> Tensor:
    """GRPO: A_i = (r_i - mean_g) / (std_g + eps), std unbiased (torch.std); without std if not norm_by_std.

    rewards [B], group_ids [B], response_mask [B,T], scorable [B] or None -> [B,T] float32.
    """
    check_estimator_options(rewards, response_mask, singleton, tol)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    scorable = check_group_inputs(rewards, group_ids, scorable)
    groups = GroupStats(rewards, group_ids, scorable, tol)
    centred = torch.where(scorable, groups.r - groups.total / groups.n.clamp(min=1), 0.0)
    advantage = centred
    if norm_by_std:
        variance = groups.per_sample(centred.square()) / (groups.n - 1).clamp(min=1)
        advantage = centred / (variance.sqrt() + eps)
    return groups.finish(advantage, singleton, response_mask)


@ADVANTAGES.register("dr_grpo", needs_groups=True)
def dr_grpo(
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    *,
    scorable: Tensor | None = None,
    singleton: str = "zero",
    tol: float = 1e-6,
) -> Tensor:
    """Dr. GRPO: A_i = r_i - mean_g (no std). rewards [B], group_ids [B], response_mask [B,T] -> [B,T] float32."""
    return grpo(
        rewards, group_ids, response_mask, scorable=scorable, norm_by_std=False, singleton=singleton, tol=tol
    )


@ADVANTAGES.register("rloo", needs_groups=True)
def rloo(
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    *,
    scorable: Tensor | None = None,
    singleton: str = "zero",
    tol: float = 1e-6,
) -> Tensor:
    """RLOO: A_i = r_i - mean of the other scorable rewards of the group.

    rewards [B], group_ids [B], response_mask [B,T], scorable [B] or None -> [B,T] float32.
    """
    check_estimator_options(rewards, response_mask, singleton, tol)
    scorable = check_group_inputs(rewards, group_ids, scorable)
    groups = GroupStats(rewards, group_ids, scorable, tol)
    others = (groups.total - groups.r) / (groups.n - 1).clamp(min=1)
    return groups.finish(groups.r - others, singleton, response_mask)
