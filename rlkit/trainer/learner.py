"""The Learner: the trained policy and everything that changes it (docs/architecture.md, "The Learner").

It owns the accelerator, the model, the frozen reference (when a plug-in or the KL needs one), the optimizer
and the LR schedule. The loop reaches the policy only through it: `update(batch)` (micro-batched forward,
token mask, per-token loss, one global normaliser per mini-batch, optimizer step), `token_stats(batch)`,
`weights()` for the rollout engine, `state_dict()`/`load_state_dict()` for checkpoints, and its rank facts.
Launched with FSDP2 (`sharded`) the model's parameters are shards (rlkit.trainer.sharding); `weights()`,
`state_dict()`, `load_*` and `save_pretrained` then gather or scatter, and every rank calls them alike.
With model.lora.enabled the model is a peft model whose adapter alone trains (rlkit.trainer.lora): `weights()`
yields the merged projections, the checkpointed weights and optimizer state are the adapter's, and the reference
is the model with its adapter disabled.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig

from rlkit.algorithms import combine_loss, k3_kl, loss_normalizer
from rlkit.algorithms.plugins import TokenMaskInputs
from rlkit.batch import PolicyOutputs, RolloutBatch
from rlkit.ranks import Ranks
from rlkit.registry import Plugin
from rlkit.trainer import lora
from rlkit.trainer.gradients import sum_over_ranks
from rlkit.trainer.metrics import UpdateStats
from rlkit.trainer.micro_batches import micro_batch_sizes, rank_share, row_tokens, split_to
from rlkit.trainer.setup import load_policy
from rlkit.trainer.sharding import (clip_grad_norm, full_model_state, full_optimizer_state, full_weights,
                                    load_full_model_state, load_full_optimizer_state)

log = logging.getLogger("rlkit")
SEED_MIX = 1_000_003  # seeds derived from cfg.seed: a large prime keeps runs with nearby seeds apart


class Learner:
    """The policy under training. `version` counts the updates applied (0: the initial weights); every sample
    a step collects carries the version that produced it (`RolloutBatch.policy_version`).

    Over several ranks every rank calls `update` with the same global batch and trains its share of each
    mini-batch; shares are equal in size (padded with rows that carry no loss), so every rank runs the same
    micro-batches and joins every collective the same number of times.
    """

    def __init__(self, cfg: DictConfig, plugins: dict[str, Plugin], accelerator: Accelerator):
        self.cfg, self.plugins, self.accelerator = cfg, plugins, accelerator
        self.ranks = Ranks(accelerator.process_index, accelerator.num_processes)
        set_seed(cfg.seed)
        needs_reference = cfg.algorithm.loss.kl_coef > 0 or any(p.capabilities.needs_reference for p in plugins.values())
        self.tokenizer, self.model, self.forward, self.reference, self.optimizer, self.scheduler, self.sharded = \
            load_policy(cfg, self.accelerator, needs_reference=needs_reference)
        self.lora = cfg.model.lora.enabled
        for key, plugin in plugins.items():
            if self.lora and plugin.capabilities.reads_lm_head:
                log.warning("%s reads the LM head, which LoRA keeps frozen: it judges the change a step on the head "
                            "would make, a proxy for the adapter's step (docs/lora.md, \"CAPO with LoRA\")", key)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.version = 0

    # ------------------------------------------------------------------ rank facts
    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    @property
    def lr(self) -> float:
        """The scheduled learning rate of the next optimizer step."""
        return self.scheduler.get_last_lr()[0]

    # ------------------------------------------------------------------ the policy's interface
    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF parameter name, full tensor) of every weight, the names the rollout engine loads; sharded, each
        tensor is all-gathered when the iterator reaches it (one at a time). LoRA: the decoder layers' projections
        only, each merged with its adapter (`lora.merged_weights`); nothing else ever changes."""
        if self.lora:
            yield from lora.merged_weights(self.model)
        else:
            yield from full_weights(self.model) if self.sharded else self.model.state_dict().items()

    def state_dict(self, *, optimizer: bool = True) -> dict:
        """Optimizer (None with `optimizer=False`), scheduler and version; the weights go through `weights()`.
        Sharded: the optimizer's full state keyed by parameter name, gathered onto rank 0 (empty elsewhere)."""
        state = (full_optimizer_state(self.model, self.optimizer) if self.sharded else self.optimizer.state_dict()) \
            if optimizer else None
        return {"optimizer": state, "scheduler": self.scheduler.state_dict(), "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        """A `state_dict()` of the same layout (sharded or not); sharded, every rank passes the full state."""
        if state["optimizer"] is not None and self.sharded:
            load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        elif state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = state["version"]

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load HF-named weights (a checkpoint's); a tied output embedding may be absent. RuntimeError on a mismatch.
        LoRA: the adapter's weights (`save_pretrained`'s adapter_model.safetensors), which must match it exactly."""
        if self.lora:
            return lora.load_adapter_state(self.model, weights)
        model = self.model
        load = load_full_model_state if self.sharded else (lambda m, w: m.load_state_dict(w, strict=False))
        missing, unexpected = load(model, weights)
        tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"the weights do not match the model: missing {missing}, unexpected {unexpected}")

    def save_pretrained(self, out: Path | None) -> None:
        """The policy and its tokenizer as an HF model directory at `out` (None: write nothing). Sharded, every
        rank calls it: the full weights are gathered onto rank 0's CPU, and rank 0 passes `out`. LoRA: the
        adapter alone (peft's adapter_config.json and adapter_model.safetensors), what a checkpoint holds."""
        if self.lora:
            if out is not None:
                self.model.save_pretrained(out, safe_serialization=True)
                self.tokenizer.save_pretrained(out)
            return
        state = full_model_state(self.model) if self.sharded else None
        if state is not None:  # as the unsharded save does: a tied weight is stored once, under its source's name
            state = {k: v for k, v in state.items() if k not in self.model.all_tied_weights_keys}
        if out is not None:
            self.model.save_pretrained(out, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(out)

    def export(self, out: Path | None) -> None:
        """The final policy at `out` (None: write nothing; every rank calls it): `save_pretrained`, and with LoRA
        and model.lora.merge_on_export also base + adapter merged into `out`/merged, a plain HF model directory."""
        self.save_pretrained(out)
        if out is not None and self.lora and self.cfg.model.lora.merge_on_export:
            lora.save_merged(self.model, out / "merged")
            self.tokenizer.save_pretrained(out / "merged")

    def close(self) -> None:
        """Leave the process group (after the engine closed: vLLM tears down its groups first)."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ the update
    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """ppo_epochs x mini_batches optimizer steps over `batch` (advantages filled); the update's metrics.

        Each micro-batch's loss is backpropagated un-normalised; once the mini-batch's final loss mask
        (token masks applied) is known, the gradient is divided by the global normaliser. So rejected
        tokens leave numerator and denominator, and any micro-batch split (or rank count) gives the same step.
        An empty batch (every group filtered out) takes no optimizer step. `version` goes up by one either way.
        """
        if not len(batch):
            self.version += 1
            return {}
        t = self.cfg.trainer
        generator = torch.Generator().manual_seed(self.cfg.seed * SEED_MIX + self.version)
        plan = [[rank_share(batch.prompt_ids, batch.lengths, mini, self.ranks, by_prompt=t.shared_prompt_forward)
                 for mini in torch.randperm(len(batch), generator=generator).chunk(t.mini_batches)]
                for _ in range(t.ppo_epochs)]
        old_logprobs = self._old_logprobs(batch, torch.cat([rows for epoch in plan for rows, _ in epoch]).unique())
        stats = UpdateStats()
        mine = torch.cat([rows[live.bool()] for rows, live in plan[0]])  # epoch 0's shares partition the batch
        weight, kept = self._rollout_correction(batch, old_logprobs, mine, stats)
        for epoch, minis in enumerate(plan):
            for mini_index, (rows, live) in enumerate(minis):
                counts, losses = [], []
                mini_rows = rows[live.bool()]
                entropy_scale = self._entropy_normalizer(batch.response_mask[mini_rows],
                                                         None if kept is None else kept[mini_rows])
                sizes = self._micro_batch_sizes(row_tokens(batch.prompt_ids, batch.lengths, rows), agree=True)
                for micro, micro_live in zip(rows.split(sizes), live.split(sizes)):
                    part = batch.select(micro)
                    part.response_mask = part.response_mask * micro_live[:, None]  # padding rows carry no loss
                    correction = None if kept is None else (weight[micro], kept[micro])
                    logprobs, loss, mask, m = self._micro_loss(part, old_logprobs[micro], entropy_scale, correction)
                    self.accelerator.backward(loss)
                    rows_mask = part.response_mask if kept is None else part.response_mask * kept[micro]
                    counts.append(self._normalizer(mask, rows_mask))
                    losses.append(m.pop("pg_loss"))
                    if epoch == 0 and mini_index == 0:  # weights not yet updated: engine vs trainer mismatch
                        stats.add_gap(logprobs.detach(), part.behavior_logprobs, self._in_context(part))
                    stats.add(m)
                normalizer = self._global_normalizer(counts)
                stats.add_loss(sum(losses) / normalizer if normalizer > 0 else 0.0)
                self._optimizer_step(normalizer, stats)
        result = stats.merged(self.ranks).result(batch)
        if t.log_policy_shift:
            result["actor/policy_shift_k3"] = self._policy_shift(batch.select(mine), old_logprobs[mine])
        self.version += 1
        return result

    def _micro_batch_sizes(self, tokens: list[int], *, agree: bool) -> list[int]:
        """Row counts of the consecutive micro-batches over rows of `tokens` tokens each (at most
        trainer.micro_batch_size rows and trainer.micro_batch_tokens tokens, where set; rlkit.trainer.micro_batches). agree: every rank runs as many
        micro-batches as the rank that needs the most (one all-reduce; ranks with equal row counts, as in
        `update`, can always split that far), so forwards, backwards and plug-ins' collectives pair up."""
        t = self.cfg.trainer
        sizes = micro_batch_sizes(tokens, rows=t.micro_batch_size, budget=t.micro_batch_tokens)
        if not agree or t.micro_batch_tokens is None:
            return sizes
        return split_to(sizes, int(self.ranks.max(len(sizes))))

    def _policy_shift(self, batch: RolloutBatch, old_logprobs: torch.Tensor) -> float:
        """Mean k3 estimate of KL(behaviour || updated policy) over the response tokens of every rank's share
        (sampled by the behaviour policy, whose logprobs are `old_logprobs` [b,T]): a no-grad forward after the update."""
        new = self.token_stats(batch).logprobs
        mask = batch.response_mask.float()
        total = self.ranks.sum(float((k3_kl(old_logprobs.float(), new, mask) * mask).sum()))
        return total / max(self.ranks.sum(float(mask.sum())), 1.0)

    @staticmethod
    def _in_context(batch: RolloutBatch) -> torch.Tensor:
        """The response mask [B,T] without off-context rows (sampled under another context, so their behaviour
        logprobs are not the trained context's: Critique-GRPO's refinements)."""
        if batch.off_context is None:
            return batch.response_mask
        return batch.response_mask * (~batch.off_context)[:, None].to(batch.response_mask.dtype)

    def _rollout_correction(self, batch: RolloutBatch, old_logprobs: torch.Tensor, mine: torch.Tensor,
                            stats: UpdateStats) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weight [B,T], keep [B,T]) of the `algorithm.rollout_correction` plug-in, or (None, None) when it makes
        none. Known before any forward (old and behaviour logprobs), so the rows it drops leave every normaliser.
        Off-context tokens weigh 1 and are kept. Its statistics over this rank's rows `mine` go into `stats`."""
        plugin = self.plugins.get("algorithm.rollout_correction")
        in_context = self._in_context(batch)
        correction = None if plugin is None else plugin(old_logprobs, batch.behavior_logprobs, in_context)
        if correction is None:
            return None, None
        inside = in_context.bool()
        weight = torch.where(inside, correction.weight.detach().to(torch.float32), 1.0)
        keep = torch.where(inside, correction.keep.to(torch.float32), 1.0)
        stats.add_correction(weight[mine], keep[mine], in_context[mine])
        return weight, keep

    def _micro_loss(self, part: RolloutBatch, old_logprobs: torch.Tensor, entropy_scale: float | None = None,
                    correction: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Forward one micro-batch -> (logprobs [b,T], un-normalised loss, final loss mask [b,T], metrics).
        entropy_scale: `_entropy_normalizer` of the mini-batch (None: entropy aggregated like the policy term).
        correction: the rollout correction's (weight [b,T], keep [b,T]) of these rows: weights multiply the per-token
        policy term, kept tokens multiply into the loss mask (None: no correction)."""
        device = self.accelerator.device
        token_mask = self.plugins["algorithm.token_mask"]
        out = self._logprobs(self.forward, part, grad=True, hidden=token_mask.capabilities.needs_hidden)
        advantages, response_mask = part.advantages.to(device), part.response_mask.to(device)
        keep = token_mask(TokenMaskInputs(
            response_ids=part.response_ids.to(device), mask=response_mask, advantages=advantages, hidden=out.hidden,
            lm_head=self.model.get_output_embeddings().weight,
            optimizer=self.optimizer, lr=self.lr, temperature=self.cfg.rollout.temperature))
        mask = response_mask * keep.to(response_mask.dtype)
        if correction is not None:
            mask = mask * correction[1].to(device, response_mask.dtype)
        per_token, m = self.plugins["algorithm.policy_loss"](
            out.logprobs, old_logprobs.to(device), advantages, mask,
            extras={k: v.to(device) for k, v in part.extras.items()})
        if correction is not None:
            per_token = per_token * correction[0].to(device, per_token.dtype)
        kl = None
        if self.reference is not None:
            kl = k3_kl(out.logprobs, self._logprobs(self.reference, part).logprobs, mask)
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
        return self.ranks.sum(sum(counts))

    def _entropy_normalizer(self, response_mask: torch.Tensor, kept: torch.Tensor | None = None) -> float | None:
        """N_entropy / N_policy of a mini-batch (this rank's live rows' response_mask [b,T], summed over ranks)
        when algorithm.loss.entropy_agg differs from agg, else None. Both come from the response mask before any
        forward: the entropy term covers every response token, N_policy only the tokens the rollout correction
        keeps (`kept` [b,T], None: all), and validation refuses token-mean with a token mask, the one N a token
        mask changes."""
        a = self.cfg.algorithm.loss
        if a.get("entropy_agg") in (None, a.agg):
            return None
        scale = a.loss_scale_factor or self.cfg.rollout.max_tokens
        policy_mask = response_mask if kept is None else response_mask * kept
        policy = self._global_normalizer([loss_normalizer(policy_mask, a.agg, scale, response_mask=policy_mask)], a.agg)
        entropy = self._global_normalizer([loss_normalizer(response_mask, a.entropy_agg, scale)], a.entropy_agg)
        return entropy / policy if policy > 0 else 1.0

    def _optimizer_step(self, normalizer: float, stats: UpdateStats) -> None:
        """Sum the gradient over ranks, scale it to the normalised loss, clip, step.

        Data parallel: one summing all-reduce here. Sharded (FSDP2): backward reduce-scattered each gradient as
        a sum over ranks already, so each rank scales and clips its shards (the norm is taken over every rank)."""
        if not self.sharded:
            sum_over_ranks((p for p in self.model.parameters() if p.requires_grad), self.world_size)
        scale = 1 / normalizer if normalizer > 0 else 0.0
        for param in self.model.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)
        if max_norm := self.cfg.trainer.max_grad_norm:
            clip = clip_grad_norm if self.sharded else self.accelerator.clip_grad_norm_
            stats.add_grad_norm(float(clip(self.model.parameters(), max_norm)))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for plugin in self.plugins.values():
            plugin.after_optimizer_step()

    def _logprobs(self, forward: torch.nn.Module, batch: RolloutBatch, *, grad: bool = False, hidden: bool = False):
        """`policy_logprobs` of `batch` through `forward` (a LogprobsForward) at the sampling temperature
        (PolicyOutputs, tensors [b,T]). A training forward (grad) runs LoRA's adapter dropout, if any."""
        dropout = lora.adapter_dropout(self.model) if grad and self.lora and self.cfg.model.lora.dropout else nullcontext()
        with torch.set_grad_enabled(grad), self.accelerator.autocast(), dropout:
            return forward(batch.prompt_ids, batch.response_ids, batch.response_mask, lengths=batch.lengths,
                           pad_id=self.pad_id, temperature=self.cfg.rollout.temperature,
                           chunk_tokens=self.cfg.trainer.logprob_chunk_tokens, return_hidden=hidden,
                           shared_prompt=self.cfg.trainer.shared_prompt_forward,
                           padding_free=self.cfg.trainer.padding_free,
                           head_recompute=self.cfg.trainer.logprob_head_recompute)

    def token_stats(self, batch: RolloutBatch) -> PolicyOutputs:
        """Logprobs and entropies [B,T] of the batch under the current policy, one micro-batch at a time (CPU).
        Sharded, every forward gathers parameters: every rank calls this together, and a rank with fewer
        micro-batches (fewer or shorter rows, or none) runs placeholder forwards until the counts pair up."""
        sizes = self._micro_batch_sizes(row_tokens(batch.prompt_ids, batch.lengths, torch.arange(len(batch))),
                                        agree=self.sharded)
        forwards = int(self.ranks.max(len(sizes))) if self.sharded else len(sizes)  # agreed before any gather
        parts = [self._logprobs(self.forward, batch.select(p)) for p in torch.arange(len(batch)).split(sizes)]
        for _ in range(forwards - len(sizes)):
            self._logprobs(self.forward, RolloutBatch.placeholder(self.pad_id))
        if not parts:
            return PolicyOutputs(torch.zeros(batch.response_ids.shape), torch.zeros(batch.response_ids.shape))
        return PolicyOutputs(torch.cat([p.logprobs.float().cpu() for p in parts]),
                             torch.cat([p.entropies.float().cpu() for p in parts]))

    def _old_logprobs(self, batch: RolloutBatch, rows: torch.Tensor) -> torch.Tensor:
        """[B,T] ratio denominators for the `rows` this rank trains: the engine's behaviour logprobs, recomputed
        by the trainer where asked (trainer.old_logprobs=recompute) or where a response was sampled in another
        context (off_context)."""
        if self.cfg.trainer.old_logprobs != "recompute":
            if batch.off_context is None or not batch.off_context.any():
                return batch.behavior_logprobs
            rows = rows[batch.off_context[rows]]
        old = batch.behavior_logprobs.clone()
        if len(rows) or self.sharded:  # sharded, a rank with no such rows still joins the others' forwards
            old[rows] = self.token_stats(batch.select(rows)).logprobs
        return old
