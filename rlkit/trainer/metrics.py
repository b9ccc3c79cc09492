"""Metric sinks: metrics.jsonl, console, tensorboard and wandb."""
from __future__ import annotations

import json
import logging
from pathlib import Path

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
            keys = ("reward/mean", "reward/accuracy", "response/length_mean", "actor/entropy", "time/step")
            log.info("step %d  %s", step, "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics))

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Append decoded responses with their scores to <run>/samples.jsonl."""
        with (self.path.parent / "samples.jsonl").open("a") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
