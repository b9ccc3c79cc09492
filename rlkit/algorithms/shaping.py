"""Reward shapers (docs/algorithms.md, "Reward shaping").

Every shaper has one signature, registered in ``SHAPERS``:
``fn(rewards [B] float, correct [B] bool, lengths [B] long, group_ids [B] long, *, scorable [B] bool, **options)
-> rewards [B] float32`` where ``lengths`` are response token counts. A shaper runs once per step on the
whole batch that is trained (after group filtering and resampling); unscorable samples (``scorable`` False)
must not be counted as wrong. Shapers return a new tensor and never modify their input.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlkit.registry import Registry

SHAPERS: Registry = Registry("reward shaper", inputs=("rewards", "correct", "lengths", "group_ids", "scorable"))


def _check(rewards: Tensor, correct: Tensor, lengths: Tensor, group_ids: Tensor, scorable: Tensor | None) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    for name, tensor in (("correct", correct), ("lengths", lengths), ("group_ids", group_ids), ("scorable", scorable)):
        if tensor is not None and tensor.shape != rewards.shape:
            raise ValueError(f"{name} must have the shape of rewards {tuple(rewards.shape)}, got {tuple(tensor.shape)}")


@SHAPERS.register("none")
def none(rewards: Tensor, correct: Tensor, lengths: Tensor, group_ids: Tensor, *, scorable: Tensor | None = None) -> Tensor:
    """Identity: a float32 copy of rewards [B]."""
    _check(rewards, correct, lengths, group_ids, scorable)
    return rewards.to(torch.float32, copy=True)


@SHAPERS.register("overlong")
def overlong(
    rewards: Tensor,
    correct: Tensor,
    lengths: Tensor,
    group_ids: Tensor,
    *,
    scorable: Tensor | None = None,
    max_response_len: int,
    buffer_len: int,
    penalty_factor: float = 1.0,
) -> Tensor:
    """DAPO soft overlong punishment: r += min(-(len - (L_max - L_buf)) / L_buf * pf, 0). [B] -> [B] float32.

    Applied to every scorable response, correct or not (DAPO); unscorable rewards are left as they are
    (their advantage is 0 anyway). Lengths beyond L_max are not clamped (the sampler never produces them).
    """
    _check(rewards, correct, lengths, group_ids, scorable)
    if not 0 < buffer_len <= max_response_len:
        raise ValueError(
            f"overlong shaping needs 0 < buffer_len <= max_response_len, got buffer_len={buffer_len}, "
            f"max_response_len={max_response_len}"
        )
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    expected = max_response_len - buffer_len
    excess = lengths.to(torch.float32) - expected
    penalty = (-excess / buffer_len * penalty_factor).clamp(max=0.0)
    if scorable is not None:
        penalty = torch.where(scorable, penalty, 0.0)
    return rewards.to(torch.float32) + penalty
