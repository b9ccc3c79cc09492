"""GRPO-λ: a length reward for the groups the policy already solves best (docs/algorithms.md, "GRPO-λ").

Once per step, on the batch that is trained: rank the groups by their share of correct responses
(stable, ties in ascending group id), give the top ⌈lam·#groups⌉ (at least one) the length reward
r = 1 − alpha·σ((L − μ)/s) on correct responses and 0 on wrong ones, leave the other groups' rewards
as they are. μ and s are the mean and population std of the lengths of the group's correct responses.
The estimator (GRPO in the recipe) then runs on the shaped rewards. alpha = 0.6 is the one value the
sources give (a write-up's code); under GRPO's std normalisation it cancels in top groups whose correct
responses share one σ (all correct, one correct, equal lengths) and matters in mixed ones.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from rlkit.algorithms.groups import group_index
from rlkit.algorithms.shaping import SHAPERS, _check

# ⌈lam·G⌉ is taken after subtracting this, so float noise (0.7·10 = 7.000000000000001) does not add a group.
_CEIL_SLACK = 1e-9


class LengthReward(NamedTuple):
    """rewards [B] float32 after shaping; efficient [B] bool, True where the sample's group got the length reward."""

    rewards: Tensor
    efficient: Tensor


def grpo_lambda_rewards(
    rewards: Tensor,
    correct: Tensor,
    lengths: Tensor,
    group_ids: Tensor,
    *,
    scorable: Tensor | None = None,
    lam: float = 0.2,
    alpha: float = 0.6,
) -> LengthReward:
    """Shape rewards [B] with correct [B] bool, lengths [B] long, group_ids [B] long, scorable [B] bool or None.

    Unscorable samples are not counted as wrong: they are left out of the correctness ratio and of μ and s,
    and keep their reward. A group with no scorable sample is not ranked and not counted in #groups.
    A group with one correct response, or correct responses of equal length (s = 0), uses z = 0: 1 − alpha/2.
    """
    _check(rewards, correct, lengths, group_ids, scorable)
    check_lambda_options(lam, alpha)
    scorable = torch.ones_like(correct, dtype=torch.bool) if scorable is None else scorable.bool()
    right = correct.bool() & scorable
    inverse, num_groups = group_index(group_ids)

    def group_sum(values: Tensor) -> Tensor:  # [B] -> [G] float64
        return torch.zeros(num_groups, dtype=torch.float64).index_add(0, inverse, values.to(torch.float64))

    scored, solved = group_sum(scorable), group_sum(right)
    ranked = scored > 0
    ratio = torch.where(ranked, solved / scored.clamp(min=1), -1.0)  # unranked groups sort last
    order = torch.sort(ratio, descending=True, stable=True).indices
    top = max(1, math.ceil(lam * int(ranked.sum()) - _CEIL_SLACK)) if bool(ranked.any()) else 0
    selected = torch.zeros(num_groups, dtype=torch.bool)
    selected[order[:top]] = True

    length = lengths.to(torch.float64)
    mean = group_sum(torch.where(right, length, 0.0)) / solved.clamp(min=1)
    centred = torch.where(right, length - mean[inverse], 0.0)
    std = (group_sum(centred.square()) / solved.clamp(min=1)).sqrt()[inverse]
    z = torch.where(std > 0, centred / std.clamp(min=1e-12), 0.0)
    length_reward = torch.where(right, 1.0 - alpha * torch.sigmoid(z), 0.0)

    efficient = selected[inverse]
    shaped = torch.where(efficient & scorable, length_reward, rewards.to(torch.float64))
    return LengthReward(shaped.to(torch.float32), efficient)


def check_lambda_options(lam: float, alpha: float) -> None:
    if not 0 < lam <= 1:
        raise ValueError(f"grpo_lambda lam: the top fraction of groups must be in (0, 1], got {lam}. Fix: e.g. lam=0.2")
    if alpha < 0:
        raise ValueError(f"grpo_lambda alpha: the length penalty must be >= 0, got {alpha}. Fix: e.g. alpha=0.6")


@SHAPERS.register("grpo_lambda", needs_groups=True)
class GrpoLambda:
    """The `grpo_lambda_rewards` shaper with its options bound; records what each step's shaping did.

    step_metrics(): grpo_lambda/efficient_group_frac (ranked groups given the length reward),
    grpo_lambda/accuracy (correct share of the scorable trained samples) and grpo_lambda/correct_length_mean
    (left out when no response was correct); then it resets.
    """

    def __init__(self, *, lam: float = 0.2, alpha: float = 0.6):
        check_lambda_options(lam, alpha)
        self.lam, self.alpha = lam, alpha
        self._metrics: dict[str, float] = {}

    def __call__(self, rewards: Tensor, correct: Tensor, lengths: Tensor, group_ids: Tensor, *,
                 scorable: Tensor | None = None) -> Tensor:
        out = grpo_lambda_rewards(rewards, correct, lengths, group_ids, scorable=scorable, lam=self.lam,
                                  alpha=self.alpha)
        scorable = torch.ones_like(correct, dtype=torch.bool) if scorable is None else scorable.bool()
        right = correct.bool() & scorable
        ranked = group_ids[scorable].unique().numel()
        self._metrics = {
            "grpo_lambda/efficient_group_frac": group_ids[out.efficient].unique().numel() / max(ranked, 1),
            "grpo_lambda/accuracy": right.sum().item() / max(int(scorable.sum()), 1),
        }
        if right.any():
            self._metrics["grpo_lambda/correct_length_mean"] = lengths[right].double().mean().item()
        return out.rewards

    def step_metrics(self) -> dict[str, float]:
        metrics, self._metrics = self._metrics, {}
        return metrics
