"""OPO: the length-weighted optimal reward baseline (docs/algorithms.md, "OPO").

For exactly on-policy updates the baseline that minimises the gradient's variance is
b = E[‖∇log π(y)‖²·r] / E[‖∇log π(y)‖²]; with ‖∇log π(y)‖² taken proportional to the response length
this is b = Σ len·r / Σ len. ``opo`` computes it per group, ``opo_batch`` once over the whole batch.
Both follow the shared rules of `rlkit.algorithms.advantages` (unscorable samples left out, singleton
groups, flat groups within ``tol``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlkit.algorithms.advantages import ADVANTAGES
from rlkit.algorithms.groups import GroupStats, check_estimator_options
from rlkit.algorithms.groups import check_group_inputs


@ADVANTAGES.register("opo", needs_groups=True, needs_on_policy=True)
def opo(
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    *,
    scorable: Tensor | None = None,
    singleton: str = "zero",
    tol: float = 1e-6,
) -> Tensor:
    """A_i = r_i − b_g with b_g = Σ_j len_j·r_j / Σ_j len_j over the scorable samples of i's group; no std.

    len_j = Σ_t response_mask[j,t]; a group whose scorable lengths sum to 0 uses the plain mean.
    rewards [B], group_ids [B], response_mask [B,T], scorable [B] or None -> [B,T] float32.
    """
    check_estimator_options(rewards, response_mask, singleton, tol)
    scorable = check_group_inputs(rewards, group_ids, scorable)
    groups = GroupStats(rewards, group_ids, scorable, tol)
    lengths = torch.where(scorable, response_mask.to(torch.float64).sum(-1), 0.0)
    weight = groups.per_sample(lengths)
    weighted = groups.per_sample(lengths * groups.r) / weight.clamp(min=1)  # lengths are whole numbers
    plain = groups.total / groups.n.clamp(min=1)
    baseline = torch.where(weight > 0, weighted, plain)
    return groups.finish(torch.where(scorable, groups.r - baseline, 0.0), singleton, response_mask)


@ADVANTAGES.register("opo_batch", needs_on_policy=True)
def opo_batch(
    rewards: Tensor,
    group_ids: Tensor,
    response_mask: Tensor,
    *,
    scorable: Tensor | None = None,
    singleton: str = "zero",
    tol: float = 1e-6,
) -> Tensor:
    """`opo` with one baseline for the whole batch (LMOps ``optimal_batch``): b = Σ len·r / Σ len over every
    scorable sample; the batch counts as one group for the ``singleton`` and ``tol`` rules.

    rewards [B], group_ids [B] (checked, not used), response_mask [B,T], scorable [B] or None -> [B,T] float32.
    """
    check_group_inputs(rewards, group_ids, scorable)
    return opo(rewards, torch.zeros_like(group_ids), response_mask, scorable=scorable, singleton=singleton, tol=tol)
