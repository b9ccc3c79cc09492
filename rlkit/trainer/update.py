"""The policy update of a step (docs/architecture.md, "The step"): micro-batched forward, token mask,
per-token loss, one global normaliser per mini-batch, optimizer step; and the logprob helpers it uses.

`PolicyUpdate` is a part of `rlkit.trainer.Trainer`, kept in its own module; it reads the trainer's
cfg, accelerator, model, ref_model, optimizer, scheduler, plugins, pad_id and step.
"""
from __future__ import annotations

import torch

from rlkit.algorithms import combine_loss, k3_kl, loss_normalizer
from rlkit.algorithms.plugins import TokenMaskInputs
from rlkit.batch import RolloutBatch
from rlkit.trainer.logprobs import PolicyOutputs, policy_logprobs
from rlkit.trainer.metrics import UpdateStats

# Seeds derived from cfg.seed: a large prime keeps runs with nearby seeds apart.
SEED_MIX = 1_000_003


class PolicyUpdate:
    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """ppo_epochs x mini_batches optimizer steps over `batch`.

        Each micro-batch's loss is backpropagated un-normalised; once the mini-batch's final loss mask
        (token masks applied) is known, the gradient is divided by the global normaliser. So rejected
        tokens leave numerator and denominator, and any micro-batch split gives the same step.
        """
        t = self.cfg.trainer
        old_logprobs = self._old_logprobs(batch)
        generator = torch.Generator().manual_seed(self.cfg.seed * SEED_MIX + self.step)
        stats = UpdateStats()
        for epoch in range(t.ppo_epochs):
            for mini_index, mini in enumerate(torch.randperm(len(batch), generator=generator).chunk(t.mini_batches)):
                lengths = torch.tensor([len(batch.prompt_ids[i]) for i in mini]) + batch.lengths[mini]
                mini = mini[lengths.argsort(descending=True, stable=True)]  # similar lengths share a micro-batch
                counts, losses = [], []
                entropy_scale = self._entropy_normalizer(batch.response_mask[mini])
                for micro in mini.split(t.micro_batch_size):
                    part = batch.select(micro)
                    logprobs, loss, mask, m = self._micro_loss(part, old_logprobs[micro], entropy_scale)
                    self.accelerator.backward(loss)
                    counts.append(self._normalizer(mask, part.response_mask))
                    losses.append(m.pop("pg_loss"))
                    if epoch == 0 and mini_index == 0:  # weights not yet updated: engine vs trainer mismatch
                        in_context = part.response_mask if part.off_context is None else \
                            part.response_mask * (~part.off_context)[:, None].to(part.response_mask.dtype)
                        stats.add_gap(logprobs.detach(), part.behavior_logprobs, in_context)
                    stats.add(m)
                normalizer = self._global_normalizer(counts)
                stats.add_loss(sum(losses) / normalizer if normalizer > 0 else 0.0)
                self._optimizer_step(normalizer, stats)
        result = stats.result(batch)
        if t.log_policy_shift:
            result["actor/policy_shift_k3"] = self._policy_shift(batch, old_logprobs)
        return result

    def _policy_shift(self, batch: RolloutBatch, old_logprobs: torch.Tensor) -> float:
        """Mean k3 estimate of KL(behaviour || updated policy) over the batch's response tokens (sampled by the
        behaviour policy, whose logprobs are `old_logprobs` [B,T]): one no-grad forward after the update."""
        new = self._token_stats(batch).logprobs
        mask = batch.response_mask.float()
        return float((k3_kl(old_logprobs.float(), new, mask) * mask).sum() / mask.sum().clamp(min=1))

    def _micro_loss(self, part: RolloutBatch, old_logprobs: torch.Tensor, entropy_scale: float | None = None):
        """Forward one micro-batch -> (logprobs [b,T], un-normalised loss, final loss mask [b,T], metrics).
        entropy_scale: `_entropy_normalizer` of the mini-batch (None: entropy aggregated like the policy term)."""
        device = self.accelerator.device
        token_mask = self.plugins["algorithm.token_mask"]
        out = self._logprobs(self.model, part, grad=True, hidden=token_mask.capabilities.needs_hidden)
        advantages, response_mask = part.advantages.to(device), part.response_mask.to(device)
        keep = token_mask(TokenMaskInputs(
            response_ids=part.response_ids.to(device), mask=response_mask, advantages=advantages, hidden=out.hidden,
            lm_head=self.accelerator.unwrap_model(self.model).get_output_embeddings().weight,
            optimizer=self.optimizer, lr=self.scheduler.get_last_lr()[0], temperature=self.cfg.rollout.temperature))
        mask = response_mask * keep.to(response_mask.dtype)
        per_token, m = self.plugins["algorithm.policy_loss"](
            out.logprobs, old_logprobs.to(device), advantages, mask,
            extras={k: v.to(device) for k, v in part.extras.items()})
        kl = None
        if self.ref_model is not None:
            kl = k3_kl(out.logprobs, self._logprobs(self.ref_model, part).logprobs, mask)
        loss_cfg = self.cfg.algorithm.loss
        loss, combined = combine_loss(per_token, mask, agg=loss_cfg.agg, normalizer=1.0, kl=kl, kl_coef=loss_cfg.kl_coef,
                                      entropies=out.entropies, entropy_coef=loss_cfg.entropy_coef,
                                      entropy_agg=None if entropy_scale is None else loss_cfg.entropy_agg,
                                      entropy_normalizer=entropy_scale, entropy_mask=response_mask)
        m.update(combined)
        m["tokens_kept_frac"] = mask.sum() / response_mask.sum().clamp(min=1)
        return out.logprobs, loss, mask, m

    def _normalizer(self, mask: torch.Tensor, response_mask: torch.Tensor) -> float:
        a = self.cfg.algorithm.loss
        return loss_normalizer(mask, a.agg, a.loss_scale_factor or self.cfg.rollout.max_tokens,
                               response_mask=response_mask)

    def _global_normalizer(self, counts: list[float], agg: str | None = None) -> float:
        """The mini-batch's denominator over every micro-batch and rank (a constant for seq-mean-token-sum-norm)."""
        if (agg or self.cfg.algorithm.loss.agg) == "seq-mean-token-sum-norm":
            return counts[0]
        total = torch.tensor(sum(counts), dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(total, reduction="sum"))

    def _entropy_normalizer(self, response_mask: torch.Tensor) -> float | None:
        """N_entropy / N_policy of a mini-batch (response_mask [B,T]) when algorithm.loss.entropy_agg differs
        from agg, else None. Both come from the response mask before any forward: the entropy term covers every
        response token, and validation refuses token-mean with a token mask, the one N a token mask changes."""
        a = self.cfg.algorithm.loss
        if a.get("entropy_agg") in (None, a.agg):
            return None
        scale = a.loss_scale_factor or self.cfg.rollout.max_tokens
        policy, entropy = (self._global_normalizer([loss_normalizer(response_mask, agg, scale)], agg)
                           for agg in (a.agg, a.entropy_agg))
        return entropy / policy if policy > 0 else 1.0

    def _optimizer_step(self, normalizer: float, stats: UpdateStats) -> None:
        """Scale the accumulated gradient to the normalised loss (data parallel averages over ranks), clip, step."""
        scale = self.accelerator.num_processes / normalizer if normalizer > 0 else 0.0
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
        if self.cfg.trainer.max_grad_norm:
            stats.add_grad_norm(float(self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                                       self.cfg.trainer.max_grad_norm)))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for plugin in self.plugins.values():
            plugin.after_optimizer_step()

    def _logprobs(self, model: torch.nn.Module, batch: RolloutBatch, *, grad: bool = False, hidden: bool = False):
        """`policy_logprobs` of `batch` under `model` at the sampling temperature (PolicyOutputs, tensors [b,T])."""
        with torch.set_grad_enabled(grad), self.accelerator.autocast():
            return policy_logprobs(model, batch.prompt_ids, batch.response_ids, batch.response_mask, pad_id=self.pad_id,
                                   temperature=self.cfg.rollout.temperature,
                                   chunk_tokens=self.cfg.trainer.logprob_chunk_tokens, return_hidden=hidden)

    def _token_stats(self, batch: RolloutBatch) -> PolicyOutputs:
        """Logprobs and entropies [B,T] of the batch under the current policy, one micro-batch at a time (CPU)."""
        parts = [self._logprobs(self.model, batch.select(p))
                 for p in torch.arange(len(batch)).split(self.cfg.trainer.micro_batch_size)]
        return PolicyOutputs(torch.cat([p.logprobs.float().cpu() for p in parts]),
                             torch.cat([p.entropies.float().cpu() for p in parts]))

    def _old_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[B,T] ratio denominators: the engine's behaviour logprobs, recomputed by the trainer where asked
        (trainer.old_logprobs=recompute) or where a response was sampled in another context (off_context)."""
        if self.cfg.trainer.old_logprobs == "recompute":
            return self._token_stats(batch).logprobs
        old = batch.behavior_logprobs
        if batch.off_context is not None and batch.off_context.any():
            rows = batch.off_context.nonzero()[:, 0]
            old = old.clone()
            old[rows] = self._token_stats(batch.select(rows)).logprobs
        return old
