"""The RL loop: sample, score, shape, filter, estimate, update, push weights, log (DESIGN.md §1).

Algorithm-blind: every method-specific choice is a registry lookup made once in `__init__`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from rlkit.algorithms import compute_advantages, loss_normalizer, shape_rewards, zero_variance_groups
from rlkit.algorithms.plugins import POLICY_LOSSES, TOKEN_MASKS, TokenMaskInputs
from rlkit.batch import RolloutBatch
from rlkit.group_filters import GROUP_FILTERS
from rlkit.data import PromptStream, build_prompt, load_rows
from rlkit.reward.pool import VerifierPool
from rlkit.rollout import SamplingConfig, create_engine
from rlkit.sampling import SAMPLERS, SamplerContext
from rlkit.trainer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from rlkit.trainer.logprobs import policy_logprobs
from rlkit.trainer.metrics import MetricsLogger

log = logging.getLogger("rlkit")


def make_scorer(reward: DictConfig):
    """The verifier stage: the reward service's client when `reward.url` is set, else an in-process pool.
    Both expose `score(responses, references) -> list[Score]`."""
    options = OmegaConf.to_container(reward.options, resolve=True)
    if not reward.url:
        return VerifierPool(reward.verifier, num_workers=reward.num_workers, timeout_s=reward.timeout_s, options=options)
    from rlkit.reward.client import RewardClient

    client = RewardClient(reward.url, verifier=reward.verifier, options=options,
                          token=os.environ.get(reward.token_env) if reward.token_env else None,
                          timeout_s=reward.request_timeout_s, retries=reward.retries, batch_size=reward.batch_size)
    client.check()  # an unreachable service fails the run at start, not after the first rollout
    return client


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.trainer.mixed_precision)
        set_seed(cfg.seed)
        self.run_dir = Path(cfg.logging.output_dir) / cfg.logging.run_name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))

        dtype = getattr(torch, cfg.model.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.ref_model = None
        if cfg.algorithm.loss.kl_coef > 0:
            self.ref_model = copy.deepcopy(model).requires_grad_(False).eval().to(self.accelerator.device)

        t = cfg.trainer
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        scheduler = get_scheduler(
            t.lr_scheduler,
            optimizer,
            num_warmup_steps=t.warmup_steps,
            num_training_steps=t.total_steps * t.ppo_epochs * t.mini_batches,
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)

        d = cfg.data
        rows = load_rows(d.source, split=d.split, prompt_column=d.prompt_column, answer_column=d.answer_column,
                         answer_format=d.answer_format, limit=d.limit, seed=cfg.seed, skip_invalid=d.skip_invalid,
                         options=OmegaConf.to_container(d.options, resolve=True))
        self.stream = PromptStream(rows, t.prompts_per_step, seed=cfg.seed)

        self.verifier = make_scorer(cfg.reward)
        r = cfg.rollout
        self.engine = create_engine(
            r.engine, cfg.model.path, dtype=r.dtype or cfg.model.dtype, max_model_len=r.max_model_len,
            gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=r.enable_sleep_mode,
            seed=cfg.seed, cpu_threads=r.cpu_threads,
        )

        a = cfg.algorithm
        self.sampler = SAMPLERS.get(a.sampler)
        self.group_filter = GROUP_FILTERS.get(a.group_filter)
        self.token_mask = TOKEN_MASKS.get(a.token_mask)
        self.loss_fn = POLICY_LOSSES.get(a.loss.name)
        self.loss_options = {k: v for k, v in OmegaConf.to_container(a.loss, resolve=True).items() if k not in ("name", "loss_scale_factor")}
        self.loss_scale_factor = a.loss.loss_scale_factor or r.max_tokens

        self.step = 0
        self.next_group_id = 0
        resume_from = self._resume_path()
        if resume_from is not None:
            state = load_checkpoint(resume_from, model=self.accelerator.unwrap_model(self.model),
                                    optimizer=self.optimizer, scheduler=self.scheduler)
            self.step, self.next_group_id = state["step"], state["next_group_id"]
            self.stream.load_state_dict(state["stream"])
            self._push_weights()
            log.info("resumed from %s at step %d", resume_from, self.step)
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, resume_step=self.step,
                                     config_dict=OmegaConf.to_container(cfg, resolve=True))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        from tqdm.auto import tqdm

        t = self.cfg.trainer
        bar = tqdm(total=t.total_steps, initial=self.step, disable=not self.cfg.logging.progress_bar, desc="rlkit")
        try:
            while self.step < t.total_steps:
                metrics = self.train_step()
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", len=f"{metrics['response/length_mean']:.0f}",
                                s=f"{metrics['time/step']:.1f}")
                if t.save_every and self.step % t.save_every == 0 and self.step < t.total_steps:
                    self.save()
            self.save()
            if t.export_final:
                self.export(self.run_dir / "final")
        finally:
            bar.close()
            self.close()

    def train_step(self) -> dict[str, float]:
        """One rollout batch and its policy update; returns the step's metrics."""
        timer, metrics = {}, {}
        start = time.perf_counter()
        batch, collect_metrics, timer["generate"], timer["reward"] = self.collect()
        metrics.update(collect_metrics)
        tick = time.perf_counter()
        if len(batch):
            a = self.cfg.algorithm
            batch.advantages = compute_advantages(
                a.advantage, batch.rewards, batch.group_ids, batch.response_mask,
                scorable=batch.scorable, **batch.estimator_inputs, **OmegaConf.to_container(a.advantage_options, resolve=True),
            )
            metrics.update(self.update(batch))
        timer["train"] = time.perf_counter() - tick
        tick = time.perf_counter()
        self._push_weights()
        timer["weight_push"] = time.perf_counter() - tick
        self.step += 1
        timer["step"] = time.perf_counter() - start
        metrics.update({f"time/{k}": v for k, v in timer.items()})
        metrics["perf/tokens_per_s"] = metrics.get("response/tokens", 0.0) / timer["step"]
        metrics["actor/lr"] = self.scheduler.get_last_lr()[0]
        if torch.cuda.is_available():
            metrics["perf/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.metrics.log(self.step, metrics)
        self.metrics.log_samples(self.step, [
            {"question": batch.rows[i]["question"], "answer": batch.rows[i]["answer"], "response": batch.texts[i],
             "extracted": batch.extracted[i], "reward": batch.rewards[i].item()}
            for i in range(min(self.cfg.logging.samples_per_step, len(batch)))])
        return metrics

    # ------------------------------------------------------------------ rollouts
    def collect(self) -> tuple[RolloutBatch, dict[str, float], float, float]:
        """Sample -> verify -> shape -> filter, resampling while a group filter leaves the batch short."""
        a, r = self.cfg.algorithm, self.cfg.rollout
        target = self.cfg.trainer.prompts_per_step
        ctx = SamplerContext(
            engine=self.engine, tokenizer=self.tokenizer,
            sampling=SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                    max_tokens=r.max_tokens, seed=self._sampling_seed()),
            build_prompt=self._build_prompt, score=self.score, pad_id=self.pad_id,
        )
        kept, seen, groups, gen_time, reward_time = [], [], 0, 0.0, 0.0
        for _ in range(a.max_sample_rounds):
            tick = time.perf_counter()
            batch = self.sampler(self.stream.next_batch(), ctx, first_group_id=self.next_group_id)
            self.next_group_id = int(batch.group_ids.max()) + 1
            gen_time += time.perf_counter() - tick
            tick = time.perf_counter()
            if batch.rewards is None:
                self.score(batch)
            batch.rewards = shape_rewards(a.reward_shaper, batch.rewards, batch.correct, batch.lengths,
                                          batch.group_ids, **OmegaConf.to_container(a.reward_shaper_options, resolve=True))
            reward_time += time.perf_counter() - tick
            seen.append(batch)
            batch = batch.select(self.group_filter(batch, tol=a.group_filter_tol).nonzero()[:, 0])
            kept.append(batch)
            groups += batch.group_ids.unique().numel()
            if groups >= target:
                break
            ctx.sampling = dataclasses.replace(ctx.sampling, seed=ctx.sampling.seed + 7919)  # fresh samples next round
        all_seen, batch = RolloutBatch.concat(seen, self.pad_id), RolloutBatch.concat(kept, self.pad_id)
        first_groups = batch.group_ids.unique(sorted=True)[:target] if groups > target else None  # earliest groups
        if first_groups is not None:
            batch = batch.select(torch.isin(batch.group_ids, first_groups).nonzero()[:, 0])
        return batch, self._rollout_metrics(all_seen, batch), gen_time, reward_time

    def score(self, batch: RolloutBatch) -> None:
        """Fill rewards [B] (0 where unscorable), correct [B] and scorable [B] from the verifier."""
        scores = self.verifier.score(batch.texts, [row["answer"] for row in batch.rows])
        batch.scorable = torch.tensor([s.reward is not None for s in scores])
        batch.rewards = torch.tensor([s.reward if s.reward is not None else 0.0 for s in scores], dtype=torch.float32)
        batch.correct = torch.tensor([s.correct for s in scores])
        batch.extracted = [s.extracted for s in scores]

    def _rollout_metrics(self, seen: RolloutBatch, batch: RolloutBatch) -> dict[str, float]:
        lengths = seen.lengths.float()
        zero_var = zero_variance_groups(seen.rewards, seen.group_ids, seen.scorable, self.cfg.algorithm.group_filter_tol)
        scorable = seen.scorable
        rewards = seen.rewards[scorable] if scorable.any() else torch.zeros(1)
        return {
            "reward/mean": rewards.mean().item(),
            "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            "reward/accuracy": seen.correct.float().mean().item(),
            "reward/unscorable": float((~scorable).sum()),
            "reward/no_answer": float(sum(e is None for e in seen.extracted)),
            "response/length_mean": lengths.mean().item(),
            "response/length_max": lengths.max().item(),
            "response/length_std": lengths.std().item() if lengths.numel() > 1 else 0.0,
            "response/truncated_frac": seen.truncated.float().mean().item(),
            "response/tokens": lengths.sum().item(),
            "batch/zero_variance_group_frac": seen.group_ids[zero_var].unique().numel() / seen.group_ids.unique().numel(),
            "batch/samples_trained": float(len(batch)),
            "batch/groups_trained": float(batch.group_ids.unique().numel()),
        }

    # ------------------------------------------------------------------ update
    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """ppo_epochs x mini_batches optimizer steps; loss normalised over each whole mini-batch."""
        t = self.cfg.trainer
        old_logprobs = batch.behavior_logprobs if t.old_logprobs == "behavior" else self._recompute_logprobs(batch)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        sums, tokens_seen = defaultdict(float), defaultdict(float)
        gap_sum = gap_max = gap_tokens = 0.0
        grad_norms = []
        for epoch in range(t.ppo_epochs):
            order = torch.randperm(len(batch), generator=generator)
            for mini_index, mini in enumerate(order.chunk(t.mini_batches)):
                normalizer = self._normalizer(batch.response_mask[mini])
                lengths = torch.tensor([len(batch.prompt_ids[i]) for i in mini]) + batch.lengths[mini]
                mini = mini[lengths.argsort(descending=True, stable=True)]  # similar lengths share a micro-batch
                for micro in mini.split(t.micro_batch_size):
                    part = batch.select(micro)
                    logprobs, loss, m = self._micro_step(part, old_logprobs[micro], normalizer)
                    self.accelerator.backward(loss)
                    if epoch == 0 and mini_index == 0:  # weights not yet updated: engine vs trainer mismatch
                        mask = part.response_mask.to(logprobs.device)
                        diff = (logprobs.detach() - part.behavior_logprobs.to(mask.device)).abs() * mask
                        gap_sum += diff.sum().item()
                        gap_max = max(gap_max, diff.max().item())
                        gap_tokens += mask.sum().item()
                    for key, value in m.items():
                        if key != "tokens":
                            sums[key] += value.item() * m["tokens"].item()
                            tokens_seen[key] += m["tokens"].item()
                if t.max_grad_norm:
                    grad_norms.append(float(self.accelerator.clip_grad_norm_(self.model.parameters(), t.max_grad_norm)))
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        metrics = {f"actor/{k}": sums[k] / max(tokens_seen[k], 1.0) for k in sums}
        metrics["rollout/logprob_gap_mean"] = gap_sum / max(gap_tokens, 1.0)
        metrics["rollout/logprob_gap_max"] = gap_max
        if grad_norms:
            metrics["actor/grad_norm"] = sum(grad_norms) / len(grad_norms)
        metrics["actor/advantage_abs_mean"] = (
            (batch.advantages.abs() * batch.response_mask).sum() / batch.response_mask.sum().clamp(min=1)).item()
        return metrics

    @torch.no_grad()
    def _recompute_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """[B,T] logprobs of the batch under the current (pre-update) policy."""
        t, out = self.cfg.trainer, torch.zeros_like(batch.behavior_logprobs)
        for micro in torch.arange(len(batch)).split(t.micro_batch_size):
            part = batch.select(micro)
            with self.accelerator.autocast():
                out[micro] = policy_logprobs(self.model, part.prompt_ids, part.response_ids, part.response_mask,
                                             pad_id=self.pad_id, temperature=self.cfg.rollout.temperature,
                                             chunk_tokens=t.logprob_chunk_tokens).logprobs.float().cpu()
        return out

    def _micro_step(self, part: RolloutBatch, old_logprobs: torch.Tensor, normalizer: float):
        """Forward one micro-batch; returns (logprobs [b,T], loss scaled for global normalisation, metrics)."""
        r, t = self.cfg.rollout, self.cfg.trainer
        device = self.accelerator.device
        with self.accelerator.autocast():
            out = policy_logprobs(self.model, part.prompt_ids, part.response_ids, part.response_mask, pad_id=self.pad_id,
                                  temperature=r.temperature, chunk_tokens=t.logprob_chunk_tokens,
                                  return_hidden=getattr(self.token_mask, "needs_hidden", False))
        advantages = part.advantages.to(device)
        mask = self.token_mask(TokenMaskInputs(
            response_ids=part.response_ids.to(device), mask=part.response_mask.to(device), advantages=advantages,
            hidden=out.hidden, lm_head=self.accelerator.unwrap_model(self.model).get_output_embeddings().weight,
            optimizer=self.optimizer, lr=self.scheduler.get_last_lr()[0]))
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref = policy_logprobs(self.ref_model, part.prompt_ids, part.response_ids, part.response_mask,
                                      pad_id=self.pad_id, temperature=r.temperature,
                                      chunk_tokens=t.logprob_chunk_tokens).logprobs
        loss, m = self.loss_fn(out.logprobs, old_logprobs.to(device), advantages, mask, normalizer=normalizer,
                               extras={k: v.to(device) for k, v in part.extras.items()},
                               ref_logprobs=ref, entropies=out.entropies, **self.loss_options)
        m["entropy"] = (out.entropies.detach() * mask).sum() / mask.sum().clamp(min=1)
        m["tokens_kept_frac"] = mask.sum() / part.response_mask.sum().clamp(min=1)
        return out.logprobs, loss, m

    def _normalizer(self, mask: torch.Tensor) -> float:
        return loss_normalizer(mask, self.cfg.algorithm.loss.agg, self.loss_scale_factor)

    # ------------------------------------------------------------------ plumbing
    def _build_prompt(self, row: dict) -> list[int]:
        d = self.cfg.data
        return build_prompt(self.tokenizer, row["question"], template=d.template, system_prompt=d.system_prompt,
                            use_chat_template=d.use_chat_template)

    def _sampling_seed(self) -> int:
        return (self.cfg.seed * 1_000_003 + self.step * 10_007) % (2**31)

    def _push_weights(self) -> None:
        self.engine.update_weights(self.accelerator.unwrap_model(self.model).state_dict().items())

    def _resume_path(self) -> Path | None:
        resume = self.cfg.trainer.resume
        if resume in (None, "", "none"):
            return None
        if resume == "auto":
            found = list_checkpoints(self.run_dir / "checkpoints")
            return found[-1] if found else None
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise FileNotFoundError(f"trainer.resume={resume}: not a checkpoint directory (expected .../checkpoints/step_N)")
        return path

    def save(self) -> Path:
        state = {"next_group_id": self.next_group_id, "stream": self.stream.state_dict()}
        return save_checkpoint(self.run_dir / "checkpoints", self.step,
                               model=self.accelerator.unwrap_model(self.model), tokenizer=self.tokenizer,
                               optimizer=self.optimizer, scheduler=self.scheduler, state=state,
                               keep_last=self.cfg.trainer.keep_last)

    def export(self, out: Path) -> None:
        self.accelerator.unwrap_model(self.model).save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)

    def close(self) -> None:
        self.metrics.close()
        self.verifier.close()
        self.engine.close()
