"""Pure tensor-in / tensor-out algorithm functions: advantage estimators, reward shapers, losses, rollout
corrections, group statistics.

Imports only torch and rlkit.registry. Every plug-in is reached by name through its registry
(docs/architecture.md); user functions plug in by import path, "package.module:function".
"""
from __future__ import annotations

from torch import Tensor

from rlkit.algorithms.advantages import ADVANTAGES
from rlkit.algorithms import capo as _capo  # noqa: F401  registers TOKEN_MASKS["capo"]
from rlkit.algorithms import critique as _critique  # noqa: F401  registers POLICY_LOSSES["critique"]
from rlkit.algorithms import fr3e as _fr3e  # noqa: F401  registers ADVANTAGES["fr3e"]
from rlkit.algorithms.groups import zero_variance_groups
from rlkit.algorithms.rollout_correction import ROLLOUT_CORRECTIONS
from rlkit.algorithms.losses import AGGREGATIONS, aggregate, combine_loss, k3_kl, loss_normalizer, policy_loss, ppo_clip_surrogate
from rlkit.algorithms.shaping import SHAPERS
from rlkit.registry import PluginSpec
from rlkit.algorithms import grpo_lambda as _grpo_lambda  # noqa: F401  registers SHAPERS["grpo_lambda"]
from rlkit.algorithms import opo as _opo  # noqa: F401  registers ADVANTAGES["opo"], ["opo_batch"]


def compute_advantages(name: str, rewards: Tensor, group_ids: Tensor, response_mask: Tensor, **options) -> Tensor:
    """Run the estimator registered as `name`. rewards [B], group_ids [B], response_mask [B,T] -> [B,T] float32."""
    return ADVANTAGES.get(name)(rewards, group_ids, response_mask, **options)


def shape_rewards(name: str, rewards: Tensor, correct: Tensor, lengths: Tensor, group_ids: Tensor, *,
                  scorable: Tensor | None = None, **options) -> Tensor:
    """Run the shaper registered as `name` (a class shaper is built with `options` first).

    rewards [B], correct [B] bool, lengths [B] long, group_ids [B], scorable [B] bool or None -> [B].
    """
    return SHAPERS.build(PluginSpec(name, options))(rewards, correct, lengths, group_ids, scorable=scorable)


__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "ROLLOUT_CORRECTIONS",
    "SHAPERS",
    "aggregate",
    "combine_loss",
    "k3_kl",
    "compute_advantages",
    "loss_normalizer",
    "policy_loss",
    "ppo_clip_surrogate",
    "shape_rewards",
    "zero_variance_groups",
]
