"""The policy loss as parts (docs/algorithms.md, "Policy loss"): a per-token surrogate, its aggregation,
and the KL and entropy terms the trainer adds once.

Normalisation is global: ``loss_normalizer`` is the denominator of a whole mini-batch (over the
final loss mask, after token masks; summed over micro-batches and ranks), and ``aggregate`` of one
micro-batch divides by it. The sum of the micro-batch losses is then the loss of the full
mini-batch, so gradient accumulation and data parallelism change nothing.
Shapes: b = rows of one micro-batch, T = padded response length.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# exp() guard for log-ratios (same bound as verl); a token this far off policy is clipped anyway.
_MAX_LOG_RATIO = 20.0


def _check_agg(agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"loss aggregation (algorithm.loss.agg) must be one of {AGGREGATIONS}, got {agg!r}")


def entropy_agg_problem(entropy_agg: str | None, agg: str, token_mask: str) -> str | None:
    """Why ``algorithm.loss.entropy_agg`` cannot work (one line, ``key: problem. Fix: ...``), or None.

    It is null or an aggregation normalised before the backward pass: a separate entropy aggregation needs
    the policy normaliser up front, which a token mask (known only after the forward) changes under token-mean.
    """
    key = "algorithm.loss.entropy_agg"
    if entropy_agg is None or entropy_agg == agg:
        return None
    if entropy_agg not in AGGREGATIONS:
        return f"{key}: unknown aggregation {entropy_agg!r}. Fix: use null (the same as algorithm.loss.agg) " \
               f"or one of {list(AGGREGATIONS)}"
    if token_mask != "none" and agg == "token-mean":
        return (f"{key}: an entropy aggregation ({entropy_agg}) other than algorithm.loss.agg=token-mean is not "
                f"supported with algorithm.token_mask={token_mask}. Fix: set {key}=null")
    return None


def loss_normalizer(mask: Tensor, agg: str, loss_scale_factor: float | None = None, *,
                    response_mask: Tensor | None = None) -> float:
    """The global loss denominator of a whole mini-batch. mask [B,T] (the final loss mask) -> float.

    token-mean: kept tokens; seq-mean-token-mean: sequences with >= 1 response token (``response_mask``
    [B,T], default ``mask``): a sequence whose every token a token mask rejected still counts, as a zero,
    as in CAPO's reference code; seq-mean-token-sum: sequences; seq-mean-token-sum-norm:
    ``loss_scale_factor`` (Dr. GRPO's constant L).
    """
    _check_agg(agg)
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B,T], got shape {tuple(mask.shape)}")
    if agg == "token-mean":
        return float(mask.sum())
    if agg == "seq-mean-token-mean":
        rows = mask if response_mask is None else response_mask
        return float((rows.sum(dim=-1) > 0).sum())
    if agg == "seq-mean-token-sum":
        return float(mask.shape[0])
    if loss_scale_factor is None:
        raise ValueError(
            "loss aggregation 'seq-mean-token-sum-norm' needs algorithm.loss.loss_scale_factor "
            "(Dr. GRPO's constant L, e.g. the maximum response length)"
        )
    if not (math.isfinite(loss_scale_factor) and loss_scale_factor > 0):
        raise ValueError(f"algorithm.loss.loss_scale_factor must be a positive number, got {loss_scale_factor}")
    return float(loss_scale_factor)


def aggregate(values: Tensor, mask: Tensor, agg: str, normalizer: float) -> Tensor:
    """Reduce per-token values [b,T] of one micro-batch to a scalar, divided by the global ``normalizer``.

    Additive over rows: summed over any split of the mini-batch into micro-batches it gives the
    full-batch value. seq-mean-token-mean first divides each row by its own length (empty rows give 0).
    Masked positions never reach the result, even when they hold inf or NaN. A normalizer of 0
    means the whole mini-batch has no tokens; the result is then 0.
    """
    _check_agg(agg)
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values and mask must both be [b,T], got {tuple(values.shape)} and {tuple(mask.shape)}")
    if not (math.isfinite(normalizer) and normalizer >= 0):
        raise ValueError(f"normalizer must be a finite number >= 0 (from loss_normalizer), got {normalizer}")
    keep = mask.bool()
    masked = torch.where(keep, values, 0.0)
    if agg == "seq-mean-token-mean":
        rows = masked.sum(dim=-1) / keep.sum(dim=-1).clamp(min=1)
        total = rows.sum()
    else:
        total = masked.sum()
    return total / normalizer if normalizer > 0 else total


def _token_mean(values: Tensor, keep: Tensor, tokens: Tensor) -> Tensor:
    return (torch.where(keep, values.to(torch.float32), 0.0).sum() / tokens.clamp(min=1)).detach()


def _check_shapes(logprobs: Tensor, **named: Tensor | None) -> None:
    for name, tensor in named.items():
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(
                f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(tensor.shape)}"
            )


def ppo_clip_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token clipped PPO surrogate with optional dual clip. All inputs [b,T] -> (loss per token [b,T], metrics).

    ratio = exp(logprobs - old_logprobs); l = max(-A*ratio, -A*clip(ratio, 1-eps_low, 1+eps_high));
    with ``dual_clip_c`` and A < 0, l = min(l, -A*c). Gradients flow through ``logprobs`` only; masked
    positions are 0. Metrics are detached token-means over ``mask`` (clip fractions, ratio) and ``ratio_max``.
    """
    _check_shapes(logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if not 0 <= eps_low < 1 or eps_high < 0:
        raise ValueError(
            f"clip range needs 0 <= eps_low < 1 and eps_high >= 0, got eps_low={eps_low}, eps_high={eps_high}"
        )
    if dual_clip_c is not None and not dual_clip_c > 1:
        raise ValueError(f"dual_clip_c must be > 1 (verl default 3, DAPO 10) or None, got {dual_clip_c}")
    keep = mask.bool()
    tokens = keep.sum().to(torch.float32)
    adv = advantages.detach().to(torch.float32)
    log_ratio = torch.where(keep, logprobs.to(torch.float32) - old_logprobs.detach().to(torch.float32), 0.0)
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    clip_changed = keep & (clipped > unclipped)
    metrics = {
        "clip_frac": _token_mean(clip_changed, keep, tokens),
        "clip_frac_low": _token_mean(clip_changed & (adv < 0), keep, tokens),
        "clip_frac_high": _token_mean(clip_changed & (adv > 0), keep, tokens),
        "ratio_mean": _token_mean(ratio, keep, tokens),
        "ratio_max": torch.where(keep, ratio, 0.0).max().detach() if keep.numel() else tokens * 0,
    }
    if dual_clip_c is not None:
        bound = -adv * dual_clip_c
        dual = (adv < 0) & (bound < per_token)
        per_token = torch.where(dual, bound, per_token)
        metrics["dual_clip_frac"] = _token_mean(dual, keep, tokens)
    else:
        metrics["dual_clip_frac"] = torch.zeros((), device=logprobs.device)
    return torch.where(keep, per_token, 0.0), metrics


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k3 estimate of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1. [b,T] -> [b,T]."""
    _check_shapes(logprobs, ref_logprobs=ref_logprobs, mask=mask)
    delta = torch.where(mask.bool(), ref_logprobs.detach().to(torch.float32) - logprobs.to(torch.float32), 0.0)
    delta = delta.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(delta) - delta - 1.0


def combine_loss(
    per_token: Tensor,
    mask: Tensor,
    *,
    agg: str,
    normalizer: float,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
    entropies: Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_agg: str | None = None,
    entropy_normalizer: float | None = None,
    entropy_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """loss = agg(per_token) + kl_coef*agg(kl) - entropy_coef*agg_e(entropies); all [b,T] over ``mask``.

    agg_e is ``entropy_agg`` divided by ``entropy_normalizer`` (its own `loss_normalizer` of the
    mini-batch) over ``entropy_mask`` [b,T] (default ``mask``; the trainer passes the response mask, so a
    token mask selects policy-gradient tokens only); None for both: ``agg`` and ``normalizer``, like the
    other terms. The trainer, which passes normalizer=1 and divides the whole gradient by the policy
    normaliser N afterwards, passes entropy_normalizer = N_entropy / N.

    Returns (scalar loss, metrics): ``pg_loss`` (this micro-batch's aggregated surrogate), token-means
    ``kl`` and ``entropy`` when given, and ``tokens`` (the mask sum).
    """
    _check_shapes(per_token, mask=mask, kl=kl, entropies=entropies)
    if kl_coef < 0 or entropy_coef < 0:
        raise ValueError(f"kl_coef and entropy_coef must be >= 0, got kl_coef={kl_coef}, entropy_coef={entropy_coef}")
    if kl_coef > 0 and kl is None:
        raise ValueError("kl_coef > 0 needs the KL to a reference model; set algorithm.loss.kl_coef=0 to train without KL")
    if (entropy_agg is None) != (entropy_normalizer is None):
        raise ValueError("entropy_agg and entropy_normalizer come together (the normaliser of that aggregation)")
    if entropy_coef > 0 and entropies is None:
        raise ValueError("entropy_coef > 0 needs entropies; set algorithm.loss.entropy_coef=0 or compute token entropies")
    keep = mask.bool()
    tokens = keep.sum().to(torch.float32)
    pg_loss = aggregate(per_token, keep, agg, normalizer)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss.detach(), "tokens": tokens}
    if kl is not None:
        metrics["kl"] = _token_mean(kl, keep, tokens)
        if kl_coef > 0:
            loss = loss + kl_coef * aggregate(kl, keep, agg, normalizer)
    if entropies is not None:
        metrics["entropy"] = _token_mean(entropies, keep, tokens)
        if entropy_coef > 0:
            e_agg, e_norm = (agg, normalizer) if entropy_agg is None else (entropy_agg, entropy_normalizer)
            e_mask = keep if entropy_agg is None or entropy_mask is None else entropy_mask.bool()
            loss = loss - entropy_coef * aggregate(entropies.to(torch.float32), e_mask, e_agg, e_norm)
    return loss, metrics


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    normalizer: float,
    agg: str = "token-mean",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip_c: float | None = None,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    entropies: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The whole PPO loss of one micro-batch: `ppo_clip_surrogate`, then `combine_loss`. All inputs [b,T].

    Returns (scalar loss, metrics) with the metrics of both parts.
    """
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError(
            "kl_coef > 0 needs ref_logprobs (a reference model); set algorithm.loss.kl_coef=0 to train without KL"
        )
    per_token, metrics = ppo_clip_surrogate(logprobs, old_logprobs, advantages, mask,
                                            eps_low=eps_low, eps_high=eps_high, dual_clip_c=dual_clip_c)
    kl = k3_kl(logprobs, ref_logprobs, mask) if ref_logprobs is not None else None
    loss, combined = combine_loss(per_token, mask, agg=agg, normalizer=normalizer, kl=kl, kl_coef=kl_coef,
                                  entropies=entropies, entropy_coef=entropy_coef)
    return loss, {**metrics, **combined}
