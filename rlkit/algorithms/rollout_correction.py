"""Rollout correction: the engine that sampled a response is not exactly the trainer (docs/algorithms.md,
"Rollout correction").

The engine's logprobs (behaviour, log μ: bf16 kernels, another backend, a lagging server) differ from the
trainer's own logprobs of the same weights, recomputed before the update (log π_old,
``trainer.old_logprobs=recompute``). The PPO ratio is taken against π_old, so the samples are off-policy by
π_old / μ; a correction reweights or drops tokens by that ratio. It multiplies into the per-token policy term
beside the policy loss, whatever the loss is.

Plug point ``algorithm.rollout_correction`` (registry `ROLLOUT_CORRECTIONS`):
``fn(old_logprobs, behavior_logprobs, mask, **options) -> Correction | None``, tensors [b,T]; ``mask`` holds
the response tokens whose behaviour logprob was sampled in the context they are trained in (the trainer zeroes
off-context rows: Critique-GRPO's refinements). None means no correction. Outside ``mask`` the trainer uses
weight 1 and keeps the token, whatever the plug-in returns.
Shapes: b = rows, T = padded response length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rlkit.registry import Registry

ROLLOUT_CORRECTIONS: Registry = Registry("rollout correction",
                                         inputs=("old_logprobs", "behavior_logprobs", "mask"))

# exp() guard for log-ratios (the bound the policy loss uses); a token this far off is truncated or dropped anyway.
_MAX_LOG_RATIO = 20.0


@dataclass
class Correction:
    """What a rollout correction does to one batch.

    weight: [b,T] float, detached: multiplies each token's policy-loss term (1: unchanged).
    keep: [b,T] in {0,1}: 0 drops the token from the loss, numerator and normaliser alike; a row with no kept
        token leaves the loss as if it had not been sampled.
    """

    weight: Tensor
    keep: Tensor


def _check_threshold(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1 and not math.isnan(value)):
        raise ValueError(f"algorithm.rollout_correction.options.{name}: must be a number > 1, got {value!r}. "
                         f"Fix: set it above 1 (e.g. 2.0)")


def log_ratio(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log(π_old / μ) per token. [b,T] x3 -> [b,T] float32, detached, 0 outside ``mask``, clamped to ±20."""
    if not old_logprobs.shape == behavior_logprobs.shape == mask.shape or old_logprobs.dim() != 2:
        raise ValueError(f"old_logprobs, behavior_logprobs and mask must all be [b,T], got {tuple(old_logprobs.shape)}, "
                         f"{tuple(behavior_logprobs.shape)} and {tuple(mask.shape)}")
    delta = old_logprobs.detach().to(torch.float32) - behavior_logprobs.detach().to(torch.float32)
    return torch.where(mask.bool(), delta, 0.0).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)


def truncated_weights(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Token-level truncated importance weights w_t = min(π_old / μ, C). [b,T] x3 -> [b,T] float32, detached;
    1 outside ``mask``. C = ``threshold`` > 1."""
    _check_threshold("threshold", threshold)
    return torch.exp(log_ratio(old_logprobs, behavior_logprobs, mask)).clamp(max=threshold)


def sequence_keep(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Rows whose geometric-mean ratio exp(mean_t log(π_old / μ)) over their ``mask`` tokens lies in [1/C, C].
    [b,T] x3 -> [b] bool; a row without tokens is kept. C = ``threshold`` > 1."""
    _check_threshold("threshold", threshold)
    tokens = mask.to(torch.float32).sum(dim=-1)
    mean = log_ratio(old_logprobs, behavior_logprobs, mask).sum(dim=-1) / tokens.clamp(min=1)
    return mean.abs() <= math.log(threshold)


def token_keep(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Tokens whose ratio π_old / μ lies in [1/C, C]. [b,T] x3 -> [b,T] bool; True outside ``mask``.
    C = ``threshold`` > 1."""
    _check_threshold("token_threshold", threshold)
    return log_ratio(old_logprobs, behavior_logprobs, mask).abs() <= math.log(threshold)


@ROLLOUT_CORRECTIONS.register("none")
def no_correction(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor) -> None:
    """No correction: every token weighs 1 and is kept (the trainer skips the step entirely)."""
    return None


@ROLLOUT_CORRECTIONS.register("tis", needs_recompute=True)
def tis(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor, *, threshold: float = 2.0) -> Correction:
    """Truncated importance sampling: each token's policy term times min(π_old / μ, threshold); nothing dropped.
    [b,T] x3 -> Correction."""
    weight = truncated_weights(old_logprobs, behavior_logprobs, mask, threshold)
    return Correction(weight, torch.ones_like(weight))


@ROLLOUT_CORRECTIONS.register("seq_mask", needs_recompute=True)
def seq_mask(old_logprobs: Tensor, behavior_logprobs: Tensor, mask: Tensor, *, threshold: float = 1.001,
             token_mask: bool = False, token_threshold: float = 2.0) -> Correction:
    """Drop rows whose geometric-mean ratio leaves [1/threshold, threshold]; with ``token_mask`` also drop single
    tokens whose ratio leaves [1/token_threshold, token_threshold]. Weights stay 1. [b,T] x3 -> Correction."""
    keep = sequence_keep(old_logprobs, behavior_logprobs, mask, threshold)[:, None].expand(mask.shape)
    if token_mask:
        keep = keep & token_keep(old_logprobs, behavior_logprobs, mask, token_threshold)
    else:
        _check_threshold("token_threshold", token_threshold)
    keep = keep.to(torch.float32)
    return Correction(torch.ones_like(keep), keep)


def rollout_correction_problem(name: str, options: dict) -> str | None:
    """Why a built-in correction's options cannot work (one line, ``key: problem. Fix: ...``), or None.
    Checked at validation, before anything loads; a plug-in named by import path checks its own options."""
    if name not in ("tis", "seq_mask"):
        return None
    for option in ("threshold", "token_threshold"):
        if option in options:
            try:
                _check_threshold(option, options[option])
            except ValueError as err:
                return str(err)
    return None


__all__ = ["Correction", "ROLLOUT_CORRECTIONS", "log_ratio", "no_correction", "rollout_correction_problem",
           "seq_mask", "sequence_keep", "tis", "token_keep", "truncated_weights"]
