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
from rlkit.trainer.metrics import MetricsLogger, rollout_metrics, step_metrics
from rlkit.trainer.run_dir import CONFIG_FILE, check_run_dir, run_dir_of
from rlkit.trainer.setup import load_policy
from rlkit.trainer.update import SEED_MIX, PolicyUpdate

log = logging.getLogger("rlkit")

# The sampling seed moves to a fresh value every step (cfg.seed is spread by SEED_MIX first).
SAMPLING_STEP_STRIDE = 10_007


class Trainer(PolicyUpdate):
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
                     options=OmegaConf.to_container(d.options, resolve=True),
                     solution_column=d.get("solution_column"))
