"""Critique-GRPO's policy loss (docs/algorithms.md, "Critique-GRPO").

Initial responses get the clipped PPO surrogate; refinements (responses sampled after a critique but
trained as answers to the question alone) get the shaped objective f(p) = p / (p + gamma) of the
current token probability, with no ratio and no clip. Per-token terms only: the trainer aggregates
them and adds the KL and entropy terms. Shapes: b = rows of one micro-batch, T = response length.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlkit.algorithms.losses import ppo_clip_surrogate
from rlkit.algorithms.plugins import POLICY_LOSSES


def shaped_probability(logprobs: Tensor, gamma: float) -> Tensor:
    """f(p) = p / (p + gamma) with p = exp(logprobs). [b,T] -> [b,T]; differentiable through ``logprobs``.

    Its gradient with respect to log p is gamma * p / (p + gamma)^2: largest at p = gamma, so unlikely
    tokens of a rewarded refinement get more weight than under log p's constant 1 times p.
    """
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0 (Critique-GRPO uses 0.1), got {gamma}")
    probs = torch.exp(logprobs.to(torch.float32))
    return probs / (probs + gamma)


def critique_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    is_refinement: Tensor,
    *,
    gamma: float = 0.1,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [b,T]: -A * f(pi_theta) on refinement rows, the clipped surrogate elsewhere.

    logprobs, old_logprobs, advantages, mask: [b,T]; is_refinement: [b] bool. Refinement tokens never
    read ``old_logprobs``. Metrics: the clipped surrogate's (over initial tokens only), ``refine_token_frac``
    and ``refine_prob_mean`` (mean pi_theta over refinement tokens), all detached.
    """
    if is_refinement.shape != logprobs.shape[:1]:
        raise ValueError(f"is_refinement must be [b] with b={logprobs.shape[0]}, got {tuple(is_refinement.shape)}")
    refine = is_refinement.bool()[:, None] & mask.bool()
    initial_mask = mask * (~is_refinement.bool())[:, None].to(mask.dtype)
    clipped, metrics = ppo_clip_surrogate(logprobs, old_logprobs, advantages, initial_mask,
                                          eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c)
    shaped = -advantages.detach().to(torch.float32) * shaped_probability(logprobs, gamma)
    per_token = torch.where(refine, shaped, clipped)
    tokens = mask.bool().sum().clamp(min=1).to(torch.float32)
    refine_tokens = refine.sum().to(torch.float32)
    metrics["refine_token_frac"] = (refine_tokens / tokens).detach()
    probs = torch.where(refine, torch.exp(logprobs.detach().to(torch.float32)), 0.0)
    metrics["refine_prob_mean"] = probs.sum() / refine_tokens.clamp(min=1)
    return per_token, metrics


@POLICY_LOSSES.register("critique", needs_extras=("is_refinement",))
def critique(logprobs, old_logprobs, advantages, mask, *, extras: dict, gamma: float = 0.1, eps_low: float = 0.2,
             eps_high: float = 0.2, dual_clip_c: float | None = None):
    """`critique_surrogate` with ``extras["is_refinement"]`` [b] from the `critique` sampler."""
    if "is_refinement" not in extras:
        raise ValueError("algorithm.policy_loss=critique: the batch has no extras['is_refinement']. "
                         "Fix: set algorithm.sampler=critique (or a sampler that marks refinements)")
    return critique_surrogate(logprobs, old_logprobs, advantages, mask, extras["is_refinement"], gamma=gamma,
                              eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c)
