"""The RL loop (docs/architecture.md, "The step"): collect -> estimate -> learner.update -> push -> log.

Algorithm-blind: every method-specific choice is a plug-in built once at start (`rlkit.config.build_plugins`);
what a plug-in needs (groups, hidden states, a reference model, saved state) it declares itself. The loop
reaches the policy only through the `Learner` (`rlkit.trainer.learner`).
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from rlkit.batch import RolloutBatch
from rlkit.config import build_plugins, spec_at
from rlkit.data import PromptStream, build_prompt, load_rows
from rlkit.eval import Evaluator
from rlkit.logs import route_library_logs
from rlkit.reward.scorer import make_scorer
from rlkit.rollout import GenerationShape, SamplingConfig, make_engine
from rlkit.sampling import Collected, SamplerContext, collect
from rlkit.trainer.async_rollouts import PRODUCER_PLUGINS, AsyncRollouts
from rlkit.trainer.checkpoint import list_checkpoints, load_checkpoint, load_in_flight, save_checkpoint
from rlkit.trainer.interrupt import StopRequest
from rlkit.trainer.metrics import MetricsLogger, pick_samples, reward_views, rollout_metrics, step_metrics
from rlkit.errors import ConfigError
from rlkit.ranks import Ranks
from rlkit.trainer.learner import SEED_MIX, Learner
from rlkit.trainer.run_dir import CONFIG_FILE, check_run_dir, rank_log_dir, resume_command, run_dir_of
from rlkit.trainer.setup import make_accelerator

log = logging.getLogger("rlkit")

# The sampling seed moves to a fresh value every step (cfg.seed is spread by SEED_MIX first).
SAMPLING_STEP_STRIDE = 10_007


class Trainer:
    """One process of a training job. Over several processes (accelerate launch / torchrun) every rank runs
    the same loop on the same global batch; rank 0 alone writes the run directory (docs/distributed.md)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        self.ranks = Ranks(self.accelerator.process_index, self.accelerator.num_processes)
        self._agree_on_run_dir()  # refuses to overwrite a run, or to resume with changes it cannot follow
        self.run_dir = run_dir_of(cfg)
        rows = training_rows(cfg)
        self.stream = PromptStream(rows, cfg.trainer.prompts_per_step, seed=cfg.seed)  # data errors first
        # vLLM's per-step chatter to <run>/train.log (other ranks: a file of their own outside the run), not the console
        route_library_logs(self.run_dir if self.ranks.is_main else rank_log_dir(cfg, self.ranks.rank))
        self.plugins = build_plugins(cfg)
        self.learner = Learner(cfg, self.plugins, self.accelerator)
        self.tokenizer, self.pad_id = self.learner.tokenizer, self.learner.pad_id
        self.scorer = make_scorer(spec_at(cfg, "reward.verifier"), OmegaConf.to_container(cfg.reward, resolve=True))
        engine = spec_at(cfg, "rollout.engine")
        auto_kv = engine.options.get("kv_cache_gib") == "auto"
        shape = generation_shape(cfg, rows, self._build_prompt, self.ranks.world_size) if auto_kv else None
        self.engine = make_engine(engine, cfg.model.path, cfg.rollout.dtype or cfg.model.dtype, shape)
        evaluates = cfg.trainer.eval_every and self.ranks.is_main
        self.evaluator = Evaluator(cfg, self.tokenizer, self.engine, self.scorer) if evaluates else None
        self.step, self.next_group_id, self.generated_tokens = 0, 0, 0
        # trainer.max_staleness >= 1: the producer thread (started by fit) and the lock that keeps the weight push
        # and evaluation between its batches; uncontended with 0
        self.rollouts: AsyncRollouts | None = None
        self.engine_lock = threading.Lock()
        self.next_batch = 0  # async: the index (sampling seed) of the first batch the producer draws
        self.carried = []  # async, fixed schedule: the resumed checkpoint's batches in flight, trained first
        self.engine_version = 0  # the learner version whose weights the engine holds (the initial ones until a push)
        self.stopped_by: int | None = None  # the signal that ended fit() early, if any
        if not self._resume() and getattr(self.engine, "push_at_start", False):
            self._push_weights()  # a running server may hold another run's weights
        self.metrics = None
        if self.ranks.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))  # what this run trains with
            self.metrics = MetricsLogger(self.run_dir, cfg.logging, resume_step=self.step,
                                         config_dict=OmegaConf.to_container(cfg, resolve=True))

    def _agree_on_run_dir(self) -> None:
        """Every rank takes rank 0's run name (`${now:...}` may differ by a second between processes); rank 0
        alone checks, clears or refuses the run directory, and a refusal stops every rank with its message."""
        log_cfg = self.cfg.logging
        log_cfg.run_name = self.ranks.broadcast(str(log_cfg.run_name))
        refusal = None
        if self.ranks.is_main:
            try:
                check_run_dir(self.cfg)
            except ConfigError as err:
                refusal = str(err)
        refusal = self.ranks.broadcast(refusal)
        if refusal is not None:
            raise ConfigError(refusal)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Train to trainer.total_steps. A first SIGINT/SIGTERM ends the loop after the current step with a
        checkpoint and the command that resumes (self.stopped_by holds the signal); a second exits at once."""
        from tqdm.auto import tqdm

        t = self.cfg.trainer
        shown = self.cfg.logging.progress_bar and self.ranks.is_main
        bar = tqdm(total=t.total_steps, initial=self.step, disable=not shown, desc="rlkit")
        try:
            with StopRequest() as stop:
                if self.step == 0 and self.evaluator is not None:
                    self.metrics.log(0, self.evaluate())  # the initial policy, before any update
                if self.step == 0 and t.eval_every:
                    self.ranks.barrier()
                if t.max_staleness:
                    self.rollouts = AsyncRollouts(self, t.max_staleness, t.async_schedule, self.carried)
                while self.step < t.total_steps and not self.budget_spent() and not self._stop_requested(stop):
                    metrics = self.train_step()
                    bar.update(1)
                    bar.set_postfix(fresh=f"{metrics.get('reward/fresh_mean', float('nan')):.3f}",
                                    trained=f"{metrics.get('reward/trained_mean', float('nan')):.3f}",
                                    len=f"{metrics.get('response/length_mean', float('nan')):.0f}",
                                    s=f"{metrics['time/step']:.1f}")
                    periodic = t.save_every and self.step % t.save_every == 0
                    if periodic and self.step < t.total_steps and not self._stop_requested(stop):
                        self.save()
                if self.rollouts is not None:
                    self.rollouts.stop()  # its batch in flight ends; batches not trained are dropped (docs/async.md)
                path = self.save()
                signalled = self._stop_requested(stop)  # on one rank is on every rank (its signal, or SIGTERM)
                self.stopped_by = (stop.signum or signal.SIGTERM) if signalled and self.step < t.total_steps else None
            if self.stopped_by is not None:
                bar.close()
                if self.ranks.is_main:
                    print(f"rlkit: stopped at step {self.step}/{t.total_steps}, checkpoint {path}. Resume: "
                          f"{self.resume_command()}", file=sys.stderr, flush=True)
            elif t.export_final:
                self.export(self.run_dir / "final")
        finally:
            if self.rollouts is not None:
                self.rollouts.stop()
            bar.close()
            self.close()

    def _stop_requested(self, stop: StopRequest) -> bool:
        """Whether any rank was asked to stop: every rank leaves the loop at the same step."""
        return self.ranks.max(float(stop.requested)) > 0

    def budget_spent(self) -> bool:
        """True once trainer.max_generated_tokens tokens were generated (methods are compared at equal budgets)."""
        budget = self.cfg.trainer.max_generated_tokens
        return budget is not None and self.generated_tokens >= budget

    def resume_command(self) -> str:
        """The command line that continues this run from its latest checkpoint (its saved config is the base)."""
        return resume_command(self.cfg)

    def train_step(self) -> dict[str, float]:
        """One rollout batch and its policy update; returns the step's metrics. With trainer.max_staleness >= 1
        the batch comes from the producer thread instead (rlkit.trainer.async_rollouts)."""
        if self.rollouts is not None:
            return self.rollouts.train_step()
        start = time.perf_counter()
        return self.train_on(self.collect(), start)

    def train_on(self, collected: Collected, start: float, produced: dict | None = None) -> dict[str, float]:
        """Estimate, update, push and log one collected batch; `start`: when the step began (time/step).
        produced: what the producer thread measured while collecting it (async only): the step metrics of the
        plug-ins that ran in collect() and of the engine, read there, and async/... and time/... entries."""
        batch = collected.batch
        tick = time.perf_counter()
        metrics = rollout_metrics(collected.seen, batch)
        metrics.update(reward_views(collected.scored, batch, collected.verifier_rewards))
        metrics["rollout/generated_tokens"] = float(collected.generated_tokens)
        metrics["rollout/generated_tokens_total"] = float(self.generated_tokens)
        if len(batch):
            batch.advantages = self.plugins["algorithm.advantage"](
                batch.rewards, batch.group_ids, batch.response_mask, scorable=batch.scorable, **batch.estimator_inputs)
        self.engine.sleep()  # frees the engine's GPU memory during the update where sleep mode is on
        lr = self.learner.lr  # the rate this update trains at (the schedule steps inside it)
        metrics.update(self.learner.update(batch))
        self.engine.wake()
        train_s = time.perf_counter() - tick
        if self.rollouts is not None:  # async, fixed schedule: the old weights' last batches are collected first
            metrics["time/learner_wait_push"] = self.rollouts.before_push()
        tick = time.perf_counter()
        with self.engine_lock:  # async: between the producer's batches
            self._push_weights()
        push_s = time.perf_counter() - tick
        self.step += 1
        timer = {"generate": collected.generate_s, "reward": collected.reward_s, "train": train_s,
                 "weight_push": push_s, "step": time.perf_counter() - start}
        metrics.update(step_metrics(timer, metrics, lr=lr, rounds=collected.rounds))
        for key, plugin in self.plugins.items():
            if produced is None or key not in PRODUCER_PLUGINS:
                metrics.update(plugin.step_metrics())
        if produced is None:
            metrics.update(getattr(self.engine, "step_metrics", dict)())  # e.g. vllm_server: rollout/weight_version
        else:
            metrics.update(produced)
        if self.cfg.trainer.eval_every and self.step % self.cfg.trainer.eval_every == 0:
            if self.evaluator is not None:  # rank 0 evaluates (outside time/step); the others wait
                with self.engine_lock:
                    metrics.update(self.evaluate())
            self.ranks.barrier()
        if self.metrics is not None:
            self.metrics.log(self.step, metrics)
            self.metrics.log_samples(self.step, pick_samples(collected.scored, self.cfg.logging.samples_per_step))
        return metrics

    # ------------------------------------------------------------------ rollouts
    def collect(self) -> Collected:
        """This step's rollouts (rlkit.sampling.collect) with the step's sampling seed."""
        collected = self.collect_batch(self.step, self.next_group_id, self.learner.version,
                                       token_stats=self.learner.token_stats)
        self.next_group_id = collected.next_group_id
        self.generated_tokens += collected.generated_tokens
        return collected

    def collect_batch(self, index: int, first_group_id: int, version: int, *, token_stats) -> Collected:
        """Rollouts of batch `index` (its sampling seed), groups numbered from `first_group_id`, every sample
        stamped with `version`; token_stats: the policy's scoring forward a sampler may call (None: none).
        Draws from self.stream; changes no other trainer state."""
        r, a = self.cfg.rollout, self.cfg.algorithm
        seed = (self.cfg.seed * SEED_MIX + index * SAMPLING_STEP_STRIDE) % (2**31)
        ctx = SamplerContext(
            engine=self.engine, tokenizer=self.tokenizer, build_prompt=self._build_prompt, score=self.score,
            token_stats=token_stats, pad_id=self.pad_id, sampling=SamplingConfig(n=r.n, temperature=r.temperature, top_p=r.top_p,
                                                        top_k=r.top_k, max_tokens=r.max_tokens, seed=seed))
        return collect(self.stream.next_batch, ctx, sampler=self.plugins["algorithm.sampler"],
                       group_filter=self.plugins["algorithm.group_filter"],
                       shaper=self.plugins["algorithm.reward_shaper"], prompts=self.cfg.trainer.prompts_per_step,
                       max_rounds=a.max_sample_rounds, first_group_id=first_group_id, pad_id=self.pad_id,
                       policy_version=version, ranks=self.ranks)

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
        self.engine.update_weights(self.learner.weights())
        self.engine_version = self.learner.version  # what the engine samples with from now on

    def _resume(self) -> bool:
        """Continue from trainer.resume's checkpoint, if there is one (its weights pushed); whether it did."""
        resume = self.cfg.trainer.resume
        if resume is None:
            return False
        found = list_checkpoints(self.run_dir / "checkpoints")
        path = (found[-1] if found else None) if resume == "auto" else Path(resume)
        if path is None:
            return False
        state, plugin_state = load_checkpoint(path, learner=self.learner, ranks=self.ranks)
        self.step, self.next_group_id = state["step"], state["next_group_id"]
        self.generated_tokens = state["generated_tokens"]
        self.next_batch = state.get("next_batch", self.step)  # async runs that dropped stale batches draw ahead
        self.stream.load_state_dict(state["stream"])
        for key, plugin in self.plugins.items():
            if plugin.stateful:
                plugin.load_state_dict(plugin_state[key])
        self.carried = self._carried(path)
        self._push_weights()
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def _carried(self, path: Path) -> list:
        """The batches in flight that `path` holds (a fixed-schedule async run), if this run can train them: the
        same trainer.max_staleness and the fixed schedule. Otherwise none: they are drawn again, with a warning."""
        in_flight, t = load_in_flight(path), self.cfg.trainer
        if not in_flight or not in_flight["batches"]:
            return []
        if t.max_staleness == in_flight["max_staleness"] and t.async_schedule == "fixed":
            return in_flight["batches"]
        log.warning("resume: %s holds %d batch(es) in flight, collected under trainer.max_staleness=%d with the "
                    "fixed schedule; this run (max_staleness=%d, async_schedule=%s) draws them again with the "
                    "checkpoint's weights, so it does not continue exactly as the saved run would have",
                    path, len(in_flight["batches"]), in_flight["max_staleness"], t.max_staleness, t.async_schedule)
        return []

    def save(self) -> Path:
        state = {"next_group_id": self.next_group_id, "generated_tokens": self.generated_tokens,
                 "stream": self.stream.state_dict()}
        plugin_state = {key: p.state_dict() for key, p in self.plugins.items() if p.stateful}
        in_flight = None
        if self.rollouts is not None:  # as of the last trained batch; `fixed` keeps the batches in flight too
            state, plugin_state = self.rollouts.checkpoint_state(state, plugin_state)
            in_flight = {"max_staleness": self.rollouts.k, "batches": self.rollouts.checkpoint_in_flight()}
        return save_checkpoint(self.run_dir / "checkpoints", self.step, learner=self.learner, ranks=self.ranks,
                               save_optimizer=self.cfg.trainer.save_optimizer, state=state,
                               plugin_state=plugin_state, keep_last=self.cfg.trainer.keep_last, in_flight=in_flight)

    def export(self, out: Path) -> None:
        self.learner.export(out if self.ranks.is_main else None)  # every rank: a sharded learner gathers
        self.ranks.barrier()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.scorer.close()
        self.engine.close()
        self.learner.close()


def training_rows(cfg: DictConfig) -> list[dict]:
    """The rows of `cfg.data`, as the trainer reads them (before its seeded order)."""
    d = cfg.data
    return load_rows(d.source, split=d.split, prompt_column=d.prompt_column, answer_column=d.answer_column,
                     answer_format=d.answer_format, limit=d.limit, seed=cfg.seed, skip_invalid=d.skip_invalid,
                     options=OmegaConf.to_container(d.options, resolve=True),
                     solution_column=d.get("solution_column"))


def generation_shape(cfg: DictConfig, rows: list[dict], build_prompt, world_size: int = 1) -> GenerationShape:
    """What one collect call may ask of a rank's engine (sizes its KV cache): the rank's share of a step's
    prompts, out of every training row (`build_prompt(row)` -> prompt ids), rollout.n samples each."""
    share = cfg.trainer.prompts_per_step // world_size  # divisible: checked at validation
    return GenerationShape(tuple(len(build_prompt(row)) for row in rows), share, cfg.rollout.n, cfg.rollout.max_tokens)
