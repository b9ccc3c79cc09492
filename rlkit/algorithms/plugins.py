"""Registries for the trainer-side plug points: policy losses and token masks (docs/architecture.md).

Policy loss: the per-token term only,
``fn(logprobs, old_logprobs, advantages, mask, *, extras, **options) -> (loss per token [b,T], metrics)``,
all tensors [b,T]; ``extras`` holds the micro-batch's method tensors (e.g. ``is_refinement`` [b]).
The trainer aggregates it and adds the KL and entropy terms (`rlkit.algorithms.losses.combine_loss`).

Token mask: ``fn(inputs: TokenMaskInputs, **options) -> keep [b,T]`` in {0,1}, multiplied into the
loss mask before the loss normaliser is known, so rejected tokens leave both the numerator and the
denominator under every aggregation. A mask that reads hidden states declares ``needs_hidden``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.algorithms.losses import ppo_clip_surrogate
from rlkit.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss", inputs=("logprobs", "old_logprobs", "advantages", "mask", "extras"))
TOKEN_MASKS: Registry = Registry("token mask", inputs=("inputs",))


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(logprobs, old_logprobs, advantages, mask, *, extras: dict, eps_low: float = 0.2,
             eps_high: float = 0.2, dual_clip_c: float | None = None):
    """`rlkit.algorithms.losses.ppo_clip_surrogate`; `extras` is not used."""
    return ppo_clip_surrogate(logprobs, old_logprobs, advantages, mask,
                              eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c)


@dataclass
class TokenMaskInputs:
    """What a token mask may read for one micro-batch.

    response_ids/mask/advantages: [b,T]; hidden: [b,T,d] final hidden states predicting each token
    (present when the mask declares ``needs_hidden``); lm_head: [V,d] output embedding;
    optimizer and lr: the live optimizer and its current scheduled learning rate;
    temperature: the sampling temperature the trainer's logprobs are taken at (logits / temperature).
    """

    response_ids: Tensor
    mask: Tensor
    advantages: Tensor
    hidden: Tensor | None
    lm_head: Tensor
    optimizer: torch.optim.Optimizer
    lr: float
    temperature: float = 1.0


@TOKEN_MASKS.register("none")
def keep_all_tokens(inputs: TokenMaskInputs) -> Tensor:
    """Keeps every response token: the loss mask is the response mask."""
    return inputs.mask
