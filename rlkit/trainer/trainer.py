"""The RL loop (docs/architecture.md, "The step"): collect -> estimate -> update -> push -> log.

Algorithm-blind: every method-specific choice is a plug-in built once at start (`rlkit.config.build_plugins`);
what a plug-in needs (groups, hidden states, a reference model, saved state) it declares itself.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig, OmegaConf

from rlkit.algorithms import combine_loss, k3_kl, loss_normalizer
from rlkit.algorithms.plugins import TokenMaskInputs
from rlkit.batch import RolloutBatch
from rlkit.config import build_plugins, spec_at
from rlkit.data import PromptStream, build_prompt, load_rows
from rlkit.eval import Evaluator
from rlkit.logs import route_library_logs
from rlkit.reward.scorer import make_scorer
from rlkit.rollout import SamplingConfig, make_engine
from rlkit.sampling import Collected, SamplerContext, collect
from rlkit.trainer.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from rlkit.trainer.interrupt import StopRequest
from rlkit.trainer.logprobs import PolicyOutputs, policy_logprobs
from rlkit.trainer.metrics import MetricsLogger, UpdateStats, rollout_metrics, step_metrics
from rlkit.trainer.run_dir import CONFIG_FILE, check_run_dir, run_dir_of
from rlkit.trainer.setup import load_policy

log = logging.getLogger("rlkit")

# Seeds derived from cfg.seed: a large prime keeps runs with nearby seeds apart; the step stride moves
# sampling to fresh seeds every step.
SEED_MIX = 1_000_003
SAMPLING_STEP_STRIDE = 10_007


class Trainer:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        check_run_dir(cfg)  # refuses to overwrite a run, or to resume with changes it cannot follow; loads nothing
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.trainer.mixed_precision)
        set_seed(cfg.seed)
        self.run_dir = run_dir_of(cfg)
        self.stream = PromptStream(_load_data(cfg), cfg.trainer.prompts_per_step, seed=cfg.seed)  # data errors first
        route_library_logs(self.run_dir)  # vLLM's per-step chatter to <run>/train.log, not the console
        self.plugins = build_plugins(cfg)
        needs_reference = cfg.algorithm.loss.kl_coef > 0 or any(p.capabilities.needs_reference for p in self.plugins.values())
        self.tokenizer, self.model, self.ref_model, self.optimizer, self.scheduler = load_policy(
            cfg, self.accelerator, needs_reference=needs_reference)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.scorer = make_scorer(spec_at(cfg, "reward.verifier"), OmegaConf.to_container(cfg.reward, resolve=True))
        self.engine = make_engine(spec_at(cfg, "rollout.engine"), cfg.model.path, cfg.rollout.dtype or cfg.model.dtype)
        self.evaluator = Evaluator(cfg, self.tokenizer, self.engine, self.scorer) if cfg.trainer.eval_every else None
        self.step, self.next_group_id, self.generated_tokens = 0, 0, 0
        self.stopped_by: int | None = None  # the signal that ended fit() early, if any
        self._resume()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))  # what this run trains with
        self.metrics = MetricsLogger(self.run_dir, cfg.logging, resume_step=self.step,
                                     config_dict=OmegaConf.to_container(cfg, resolve=True))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Train to trainer.total_steps. A first SIGINT/SIGTERM ends the loop after the current step with a
        checkpoint and the command that resumes (self.stopped_by holds the signal); a second exits at once."""
        from tqdm.auto import tqdm

        t = self.cfg.trainer
        bar = tqdm(total=t.total_steps, initial=self.step, disable=not self.cfg.logging.progress_bar, desc="rlkit")
        try:
            with StopRequest() as stop:
                if self.step == 0 and self.evaluator is not None:
                    self.metrics.log(0, self.evaluate())  # the initial policy, before any update
                while self.step < t.total_steps and not self.budget_spent() and not stop.requested:
                    metrics = self.train_step()
                    bar.update(1)
                    bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}",
                                    len=f"{metrics.get('response/length_mean', float('nan')):.0f}",
                                    s=f"{metrics['time/step']:.1f}")
                    periodic = t.save_every and self.step % t.save_every == 0
                    if periodic and self.step < t.total_steps and not stop.requested:
                        self.save()
                path = self.save()
                self.stopped_by = stop.signum if self.step < t.total_steps else None
            if self.stopped_by is not None:
                bar.close()
                print(f"rlkit: stopped at step {self.step}/{t.total_steps}, checkpoint {path}. Resume: "
                      f"{self.resume_command()}", file=sys.stderr, flush=True)
            elif t.export_final:
                self.export(self.run_dir / "final")
        finally:
            bar.close()
            self.close()

    def budget_spent(self) -> bool:
        """True once trainer.max_generated_tokens tokens were generated (methods are compared at equal budgets)."""
        budget = self.cfg.trainer.max_generated_tokens
        return budget is not None and self.generated_tokens >= budget

    def resume_command(self) -> str:
        """The command line that continues this run from its latest checkpoint (its saved config is the base)."""
        where = f"logging.run_name={self.cfg.logging.run_name}"
        if self.cfg.logging.output_dir != "runs":
            where = f"logging.output_dir={self.cfg.logging.output_dir} {where}"
        return f"python -m rlkit.train {where} trainer.resume=auto"

    def train_step(self) -> dict[str, float]:
        """One rollout batch and its policy update; returns the step's metrics."""
        start = time.perf_counter()
        collected = self.collect()
        batch = collected.batch
        tick = time.perf_counter()
        metrics = rollout_metrics(collected.seen, batch)
        metrics["rollout/generated_tokens"] = float(collected.generated_tokens)
        metrics["rollout/generated_tokens_total"] = float(self.generated_tokens)
        if len(batch):
            batch.advantages = self.plugins["algorithm.advantage"](
                batch.rewards, batch.group_ids, batch.response_mask, scorable=batch.scorable, **batch.estimator_inputs)
            self.engine.sleep()  # frees the engine's GPU memory during the update where sleep mode is on
            metrics.update(self.update(batch))
            self.engine.wake()
        train_s = time.perf_counter() - tick
        tick = time.perf_counter()
        self._push_weights()
        push_s = time.perf_counter() - tick
        self.step += 1
        timer = {"generate": collected.generate_s, "reward": collected.reward_s, "train": train_s,
                 "weight_push": push_s, "step": time.perf_counter() - start}
        metrics.update(step_metrics(timer, metrics, lr=self.scheduler.get_last_lr()[0], rounds=collected.rounds))
        for plugin in self.plugins.values():
            metrics.update(plugin.step_metrics())
        if self.evaluator is not None and self.step % self.cfg.trainer.eval_every == 0:
            metrics.update(self.evaluate())  # outside time/step
        self.metrics.log(self.step, metrics)
        self.metrics.log_samples(self.step, batch, self.cfg.logging.samples_per_step)
        return metrics

    # ------------------------------------------------------------------ rollouts
    def collect(self) -> Collected:
        """This step's rollouts (rlkit.sampling.collect) with the step's sampling seed."""
        r, a = self.cfg.rollout, self.cfg.algorithm
        seed = (self.cfg.seed * SEED_MIX + self.step * SAMPLING_STEP_STRIDE) % (2**31)
        ctx = SamplerContext(
            engine=self.engine, tokenizer=self.tokenizer, build_prompt=self._build_prompt, score=self.score,
            token_stats=self._token_stats, pad_id=self.pad_id, sampling=SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p,
                                                        top_k=r.top_k, max_tokens=r.max_tokens, seed=seed))
        collected = collect(self.stream.next_batch, ctx, sampler=self.plugins["algorithm.sampler"],
                            group_filter=self.plugins["algorithm.group_filter"],
                            shaper=self.plugins["algorithm.reward_shaper"], prompts=self.cfg.trainer.prompts_per_step,
                            max_rounds=a.max_sample_rounds, first_group_id=self.next_group_id, pad_id=self.pad_id)
        self.next_group_id = collected.next_group_id
        self.generated_tokens += collected.generated_tokens
        return collected

    def evaluate(self) -> dict[str, float]:
        """eval/<benchmark>/<metric> of the current policy (weights already pushed), and time/eval."""
        tick = time.perf_counter()
        metrics = self.evaluator.run()
        metrics["time/eval"] = time.perf_counter() - tick
        return metrics

    def score(self, batch: RolloutBatch) -> None:
        """Fill rewards [B] (0 where unscorable), correct [B], scorable [B] and extracted from the verifier."""
        scores = self.scorer.score(batch.texts, [row["answer"] for row in batch.rows])
        batch.scorable = torch.tensor([s.reward is not None for s in scores], dtype=torch.bool)
        batch.rewards = torch.tensor([s.reward if s.reward is not None else 0.0 for s in scores], dtype=torch.float32)
        batch.correct = torch.tensor([s.correct for s in scores], dtype=torch.bool)
        batch.extracted = [s.extracted for s in scores]

    # ------------------------------------------------------------------ update
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
                for micro in mini.split(t.micro_batch_size):
                    part = batch.select(micro)
                    logprobs, loss, mask, m = self._micro_loss(part, old_logprobs[micro])
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

    def _micro_loss(self, part: RolloutBatch, old_logprobs: torch.Tensor):
        """Forward one micro-batch -> (logprobs [b,T], un-normalised loss, final loss mask [b,T], metrics)."""
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
                                      entropies=out.entropies, entropy_coef=loss_cfg.entropy_coef)
        m.update(combined)
        m["tokens_kept_frac"] = mask.sum() / response_mask.sum().clamp(min=1)
        return out.logprobs, loss, mask, m

    def _normalizer(self, mask: torch.Tensor, response_mask: torch.Tensor) -> float:
        a = self.cfg.algorithm.loss
        return loss_normalizer(mask, a.agg, a.loss_scale_factor or self.cfg.rollout.max_tokens,
                               response_mask=response_mask)

    def _global_normalizer(self, counts: list[float]) -> float:
        """The mini-batch's denominator over every micro-batch and rank (a constant for seq-mean-token-sum-norm)."""
        if self.cfg.algorithm.loss.agg == "seq-mean-token-sum-norm":
            return counts[0]
        total = torch.tensor(sum(counts), dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(total, reduction="sum"))

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

    # ------------------------------------------------------------------ plumbing
    def _build_prompt(self, row: dict) -> list[int]:
        d = self.cfg.data
        return build_prompt(self.tokenizer, row["question"], template=d.template, system_prompt=d.system_prompt,
                            use_chat_template=d.use_chat_template)

    def _push_weights(self) -> None:
        self.engine.update_weights(self.accelerator.unwrap_model(self.model).state_dict().items())

    def _resume(self) -> None:
        resume = self.cfg.trainer.resume
        if resume is None:
            return
        found = list_checkpoints(self.run_dir / "checkpoints")
        path = (found[-1] if found else None) if resume == "auto" else Path(resume)
        if path is None:
            return
        state, plugin_state = load_checkpoint(path, model=self.accelerator.unwrap_model(self.model),
                                              optimizer=self.optimizer, scheduler=self.scheduler)
        self.step, self.next_group_id = state["step"], state["next_group_id"]
        self.generated_tokens = state["generated_tokens"]
        self.stream.load_state_dict(state["stream"])
        for key, plugin in self.plugins.items():
            if plugin.stateful:
                plugin.load_state_dict(plugin_state[key])
        self._push_weights()
        log.info("resumed from %s at step %d", path, self.step)

    def save(self) -> Path:
        state = {"next_group_id": self.next_group_id, "generated_tokens": self.generated_tokens,
                 "stream": self.stream.state_dict()}
        plugin_state = {key: p.state_dict() for key, p in self.plugins.items() if p.stateful}
        return save_checkpoint(self.run_dir / "checkpoints", self.step,
                               model=self.accelerator.unwrap_model(self.model), tokenizer=self.tokenizer,
                               optimizer=self.optimizer if self.cfg.trainer.save_optimizer else None,
                               scheduler=self.scheduler, state=state, plugin_state=plugin_state,
                               keep_last=self.cfg.trainer.keep_last)

    def export(self, out: Path) -> None:
        self.accelerator.unwrap_model(self.model).save_pretrained(out, safe_serialization=True)
        self.tokenizer.save_pretrained(out)

    def close(self) -> None:
        self.metrics.close()
        self.scorer.close()
        self.engine.close()


def _load_data(cfg: DictConfig) -> list[dict]:
    d = cfg.data
    return load_rows(d.source, split=d.split, prompt_column=d.prompt_column, answer_column=d.answer_column,
                     answer_format=d.answer_format, limit=d.limit, seed=cfg.seed, skip_invalid=d.skip_invalid,
                     options=OmegaConf.to_container(d.options, resolve=True))
