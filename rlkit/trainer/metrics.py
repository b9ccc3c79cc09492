"""Step metrics and their sinks: metrics.jsonl, samples.jsonl, console, tensorboard and wandb."""
from __future__ import annotations

import json
import logging
import resource
import sys
from collections import defaultdict
from pathlib import Path

import psutil
import torch

from rlkit.algorithms import zero_variance_groups
from rlkit.batch import SAMPLE_KINDS, RolloutBatch
from rlkit.ranks import Ranks
from rlkit.sampling.collect import ScoredSample

log = logging.getLogger("rlkit")


class MetricsLogger:
    """Writes one JSON line per step to <run>/metrics.jsonl and mirrors it to the enabled sinks."""

    def __init__(self, run_dir: Path, cfg, *, resume_step: int = 0, config_dict: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.console_every = cfg.console_every
        for path in (self.path, run_dir / "samples.jsonl"):
            if path.exists():  # drop lines past the checkpoint we resume from (all of them on a fresh start)
                lines = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= resume_step]
                path.write_text("".join(l + "\n" for l in lines))
        self.tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))
        self.wandb = None
        if cfg.wandb:
            try:
                import wandb
            except ImportError as err:
                raise ImportError("logging.wandb=true needs `pip install wandb` (or set logging.wandb=false)") from err
            self.wandb = wandb.init(project=cfg.wandb_project, name=run_dir.name, config=config_dict, dir=str(run_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.console_every and step % self.console_every == 0:
            keys = ("reward/fresh_mean", "reward/trained_mean", "response/length_mean", "actor/entropy", "time/step")
            log.info("step %d  %s", step, "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics))

    def log_samples(self, step: int, samples: list[ScoredSample]) -> None:
        """Append `samples` (decoded, with the verifier's reward, kind and notes) to <run>/samples.jsonl."""
        with (self.path.parent / "samples.jsonl").open("a") as f:
            for s in samples:
                sample = {"kind": s.kind, "question": s.question, "answer": s.answer, "response": s.response,
                          "extracted": s.extracted, "reward": s.reward if s.scorable else None, **s.notes}
                f.write(json.dumps({"step": step, **sample}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def rollout_metrics(seen: RolloutBatch, batch: RolloutBatch) -> dict[str, float]:
    """Rewards and lengths of everything sampled this step (`seen`, verifier rewards) and what is trained (`batch`).

    A step that returned no sample (a sampler whose every group was flat, say) logs only the batch counts.
    """
    trained = {"batch/samples_trained": float(len(batch)), "batch/groups_trained": float(batch.group_ids.unique().numel()),
               "batch/prompts_trained": float(batch.prompt_index.unique().numel()), **trained_tokens(batch)}
    if not len(seen):
        return trained
    lengths = seen.lengths.float()
    scorable = seen.scorable
    rewards = seen.rewards[scorable] if scorable.any() else torch.zeros(1)
    zero_var = zero_variance_groups(seen.rewards, seen.group_ids, scorable)
    prompts, which = seen.prompt_index.unique(return_inverse=True)
    solved = torch.zeros(prompts.numel()).index_add_(0, which, seen.correct.float()) > 0
    metrics = {
        "reward/mean": rewards.mean().item(),
        "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "reward/accuracy": seen.correct.float().mean().item(),
        "reward/prompts_solved_frac": solved.float().mean().item(),
        "reward/unscorable": float((~scorable).sum()),
        "reward/no_answer": float(sum(e is None for e in seen.extracted)),
        "response/length_mean": lengths.mean().item(),
        "response/length_max": lengths.max().item(),
        "response/length_std": lengths.std().item() if lengths.numel() > 1 else 0.0,
        "response/truncated_frac": seen.truncated.float().mean().item(),
        "response/tokens": lengths.sum().item(),
        "batch/zero_variance_group_frac": seen.group_ids[zero_var].unique().numel() / seen.group_ids.unique().numel(),
        **trained,
    }
    if len(batch):
        metrics["reward/shaped_mean"] = batch.rewards[batch.scorable].mean().item() if batch.scorable.any() else 0.0
    return metrics


def trained_tokens(batch: RolloutBatch) -> dict[str, float]:
    """batch/tokens_trained: prompt + response tokens of every trained row (what a per-sequence forward runs);
    batch/tokens_trained_distinct: each distinct prompt once plus every response (the least a forward must run,
    what trainer.shared_prompt_forward runs)."""
    prompts = [tuple(p) for p in batch.prompt_ids]
    responses = float(batch.lengths.sum()) if len(batch) else 0.0
    return {"batch/tokens_trained": responses + sum(map(len, prompts)),
            "batch/tokens_trained_distinct": responses + sum(map(len, set(prompts)))}


def pick_samples(scored: list[ScoredSample], count: int) -> list[ScoredSample]:
    """The first `count` samples of each kind, kinds in SAMPLE_KINDS order (a sampler's refinements are
    logged beside its fresh responses, not crowded out by them)."""
    return [s for kind in SAMPLE_KINDS for s in [s for s in scored if s.kind == kind][:count]]


def reward_views(scored: list[ScoredSample], batch: RolloutBatch, verifier_rewards: torch.Tensor) -> dict[str, float]:
    """reward/fresh_{mean,accuracy}: the verifier over every fresh sample of the step (drawn from the question
    alone, in any round, trained or not), the same measure for every sampler. reward/trained_{mean,accuracy}:
    the verifier over the trained batch before shaping (FR3E's branches, Critique-GRPO's refinements included).
    Means over scorable samples, accuracies over all; a view with no sample is left out.
    verifier_rewards: [len(batch)]."""
    out = {}
    fresh = [s for s in scored if s.kind == "fresh"]
    if fresh:
        rewards = [s.reward for s in fresh if s.scorable]
        out["reward/fresh_mean"] = sum(rewards) / len(rewards) if rewards else 0.0
        out["reward/fresh_accuracy"] = sum(s.correct for s in fresh) / len(fresh)
    if len(batch):
        scorable = batch.scorable
        out["reward/trained_mean"] = verifier_rewards[scorable].mean().item() if scorable.any() else 0.0
        out["reward/trained_accuracy"] = batch.correct.float().mean().item()
    return out


def step_metrics(timer: dict[str, float], metrics: dict[str, float], *, lr: float, rounds: int) -> dict[str, float]:
    """Timings, throughput, learning rate, the process's memory and peak GPU memory of one step."""
    out = {f"time/{k}": v for k, v in timer.items()}
    out["perf/tokens_per_s"] = metrics.get("response/tokens", 0.0) / timer["step"]
    out["actor/lr"] = lr
    out["batch/sample_rounds"] = float(rounds)
    out["perf/rss_gib"], out["perf/rss_peak_gib"] = process_memory_gib()
    if torch.cuda.is_available():
        out["perf/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def process_memory_gib() -> tuple[float, float]:
    """(resident, peak resident since start) memory of this process in GiB; a colocated vLLM engine lives in
    the same process, so both count it."""
    resident = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return resident / 2**30, max(peak, resident) / 2**30  # the kernel's high-water mark lags a little


class UpdateStats:
    """Accumulates the update's metrics: token-weighted loss terms, losses, grad norms, logprob gap, rollout correction."""

    def __init__(self):
        self.sums, self.tokens = defaultdict(float), defaultdict(float)
        self.losses, self.grad_norms = [], []
        self.gap_sum = self.gap_max = self.gap_tokens = 0.0
        self.correction = False  # a rollout correction ran this update
        self.rc_tokens = self.rc_kept = self.rc_weight_sum = self.rc_weight_max = 0.0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        """Metrics of one micro-batch: token-means weighted by its kept tokens (`metrics["tokens"]`)."""
        tokens = metrics["tokens"].item()
        for key, value in metrics.items():
            if key != "tokens":
                self.sums[key] += value.item() * tokens
                self.tokens[key] += tokens

    def add_loss(self, loss: float) -> None:
        self.losses.append(float(loss))

    def add_grad_norm(self, norm: float) -> None:
        self.grad_norms.append(norm)

    def add_gap(self, logprobs: torch.Tensor, behavior: torch.Tensor, mask: torch.Tensor) -> None:
        """|trainer - engine| logprobs [b,T] over response tokens, before any weight update."""
        mask = mask.to(logprobs.device)
        diff = (logprobs - behavior.to(logprobs.device)).abs() * mask
        self.gap_sum += diff.sum().item()
        self.gap_max = max(self.gap_max, diff.max().item())
        self.gap_tokens += mask.sum().item()

    def add_correction(self, weight: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> None:
        """A rollout correction's weight and keep [b,T] over the response tokens it judged (`mask` [b,T]: in-context
        response tokens): counted as sums and a maximum, so rows and ranks merge exactly."""
        mask = mask.to(weight.device, torch.float32)
        kept = mask * keep.to(torch.float32)
        self.correction = True
        self.rc_tokens += mask.sum().item()
        self.rc_kept += kept.sum().item()
        self.rc_weight_sum += (weight * kept).sum().item()
        if kept.any():
            self.rc_weight_max = max(self.rc_weight_max, weight[kept.bool()].max().item())

    def merged(self, ranks: Ranks) -> "UpdateStats":
        """The statistics of every rank's share together (sums added, maxima taken; grad norms are the same
        on every rank once gradients are summed)."""
        if ranks.world_size == 1:
            return self
        merged, parts = UpdateStats(), ranks.gather(self)
        for part in parts:
            for key in part.sums:
                merged.sums[key] += part.sums[key]
                merged.tokens[key] += part.tokens[key]
            merged.gap_sum += part.gap_sum
            merged.gap_tokens += part.gap_tokens
            merged.gap_max = max(merged.gap_max, part.gap_max)
            merged.correction = merged.correction or part.correction
            merged.rc_tokens += part.rc_tokens
            merged.rc_kept += part.rc_kept
            merged.rc_weight_sum += part.rc_weight_sum
            merged.rc_weight_max = max(merged.rc_weight_max, part.rc_weight_max)
        merged.losses = [sum(losses) for losses in zip(*(part.losses for part in parts))]
        merged.grad_norms = list(self.grad_norms)
        return merged

    def result(self, batch: RolloutBatch) -> dict[str, float]:
        metrics = {f"actor/{k}": self.sums[k] / max(self.tokens[k], 1.0) for k in self.sums}
        metrics["actor/pg_loss"] = sum(self.losses) / len(self.losses)
        metrics["rollout/logprob_gap_mean"] = self.gap_sum / max(self.gap_tokens, 1.0)
        metrics["rollout/logprob_gap_max"] = self.gap_max
        if self.correction:  # over in-context response tokens; weights over the kept ones
            metrics["rollout_correction/kept_frac"] = self.rc_kept / self.rc_tokens if self.rc_tokens else 1.0
            metrics["rollout_correction/weight_mean"] = self.rc_weight_sum / self.rc_kept if self.rc_kept else 1.0
            metrics["rollout_correction/weight_max"] = self.rc_weight_max if self.rc_kept else 1.0
        if self.grad_norms:
            metrics["actor/grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        mask = batch.response_mask
        metrics["actor/advantage_abs_mean"] = ((batch.advantages.abs() * mask).sum() / mask.sum().clamp(min=1)).item()
        return metrics
