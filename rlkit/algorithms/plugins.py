"""Registries for the trainer-side plug points: policy losses and token masks (DESIGN.md §2).

Policy loss: fn(logprobs, old_logprobs, advantages, mask, *, normalizer, extras, **options) -> (loss, metrics),
all tensors [b,T]; `extras` holds the micro-batch's method-specific tensors (e.g. `is_refinement` [b]).
Token mask: fn(inputs: TokenMaskInputs, **options) -> mask [b,T] in {0,1}, multiplied into the loss mask;
rejected tokens leave both numerator and denominator of the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.algorithms.losses import policy_loss
from rlkit.registry import Registry

POLICY_LOSSES: Registry = Registry("policy loss")
TOKEN_MASKS: Registry = Registry("token mask")


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(logprobs, old_logprobs, advantages, mask, *, normalizer: float, extras: dict, **options):
    """The clipped surrogate of `rlkit.algorithms.losses.policy_loss`; `extras` is not used."""
    return policy_loss(logprobs, old_logprobs, advantages, mask, normalizer=normalizer, **options)


@dataclass
class TokenMaskInputs:
    """What a token mask may read for one micro-batch.

    response_ids/mask/advantages: [b,T]; hidden: [b,T,d] final hidden states predicting each token
    (present when the mask declares `needs_hidden = True`); lm_head: [V,d] output embedding;
    optimizer and lr: the live optimizer and its current scheduled learning rate.
    """

    response_ids: Tensor
    mask: Tensor
    advantages: Tensor
    hidden: Tensor | None
    lm_head: Tensor
    optimizer: torch.optim.Optimizer
    lr: float


@TOKEN_MASKS.register("none")
def keep_all_tokens(inputs: TokenMaskInputs) -> Tensor:
    """Keeps every response token: the loss mask is the response mask."""
    return inputs.mask
