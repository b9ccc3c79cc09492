"""A run directory across starts: never overwrite a run's history by accident, continue a run from its own
saved config, and clear what an interrupted save left behind.

`runs/<name>/config.yaml` is the config a run trains with (values resolved). A resume takes it as the base;
`continue_from_saved` puts the command line's changes on top, and `check_run_dir` refuses the changes a
checkpoint cannot follow (model, batch shape, method, seed, data) and logs the others as a diff.
"""
from __future__ import annotations

import logging
import re
import shlex
import shutil
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlkit.errors import ConfigError
from rlkit.trainer.checkpoint import list_checkpoints, remove_stale_temps

log = logging.getLogger("rlkit")

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
HISTORY = (METRICS_FILE, "samples.jsonl", "checkpoints", "final", "tb")  # what logging.overwrite=true removes

# Keys rlkit no longer reads, dropped (with a warning) from a saved config a resume takes as its base.
RETIRED_KEYS = {
    "rollout.engine.options.cpu_threads": "the colocated vLLM engine runs on the trainer's torch threads (vLLM "
                                          "binds threads only for worker processes it starts)",
}

# Keys a resumed run cannot change (a key or a whole block), with the reason shown when one is refused.
_BATCH = "the batch shape (prompts x rollout.n, mini-batches, epochs) and the LR schedule's length follow it"
_DATA = "the checkpoint's data position counts rows of this dataset"
FIXED = {
    "model.path": "the checkpoint holds this model's weights",
    "model.dtype": "the checkpoint's weights and optimizer state have this precision",
    "seed": "it seeds data order and sampling, which the checkpoint continues",
    "rollout.n": _BATCH,
    "trainer.prompts_per_step": _BATCH,
    "trainer.mini_batches": _BATCH,
    "trainer.ppo_epochs": _BATCH,
    "algorithm": "the method is fixed for a run (plug-in state in the checkpoint follows it)",
    **{f"data.{key}": _DATA for key in ("source", "split", "limit", "options", "prompt_column", "answer_column",
                                        "answer_format", "skip_invalid")},
}
NOT_DIFFED = ("trainer.resume",)  # always differs on a resume; not worth a log line


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.logging.output_dir) / cfg.logging.run_name


def resume_command(cfg: DictConfig) -> str:
    """The command line, as a shell and Hydra read it, that continues this run from its latest checkpoint."""
    where = [] if cfg.logging.output_dir == "runs" else [_override("logging.output_dir", cfg.logging.output_dir)]
    return " ".join(["python -m rlkit.train", *where, _override("logging.run_name", cfg.logging.run_name),
                     "trainer.resume=auto"])


def _override(key: str, value: object) -> str:
    """`key=value` as one shell word that Hydra reads back as the string `value` (quoted for Hydra if needed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    text, parser = str(value), OverridesParser.create()
    try:
        plain = parser.parse_override(f"{key}={text}").value() == text
    except HydraException:  # Hydra's grammar refuses it unquoted (a space, brackets, ...)
        plain = False
    # Hydra's quoted strings unescape only the backslashes before a quote or the closing quote
    quoted = "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text) + "'"
    return shlex.quote(f"{key}={text if plain else quoted}")


def saved_config_path(cfg: DictConfig) -> Path | None:
    """The config.yaml of the run a resume continues: this run's (auto), or the one owning the checkpoint."""
    resume = cfg.trainer.resume
    if resume is None:
        return None
    run_dir = run_dir_of(cfg) if resume == "auto" else Path(str(resume)).parent.parent  # <run>/checkpoints/step_N
    return run_dir / CONFIG_FILE


def continue_from_saved(cfg: DictConfig, base: dict, overrides: list[str]) -> DictConfig:
    """The config a resume runs: the run's saved config, with every value the command line set on top.

    cfg: composed from defaults and the command line `overrides` (Hydra's `KEY=VALUE`, `+KEY=VALUE`,
    `GROUP=CHOICE`); base: composed from defaults alone (`rlkit.config.default_config()`). A value the command
    line set is one an override names (even if it equals the default) or one where cfg differs from base (what a
    group choice or recipe changed). Without trainer.resume or a saved config: cfg itself.
    """
    path = saved_config_path(cfg)
    if path is None or not path.is_file():
        return cfg
    given = OmegaConf.to_container(cfg, resolve=False)
    merged = overlay(_without_retired_keys(OmegaConf.to_container(OmegaConf.load(path), resolve=False), path),
                     given, base)
    for key in override_keys(overrides):
        _set(merged, key, given)
    out = OmegaConf.create(merged)
    OmegaConf.set_struct(out, True)
    return out


def _without_retired_keys(saved: dict, path: Path) -> dict:
    """`saved` without the RETIRED_KEYS it holds, each named in a warning."""
    for key, why in RETIRED_KEYS.items():
        *parents, last = key.split(".")
        node = saved
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and last in node:
            del node[last]
            log.warning("resume: %s in %s is no longer read and is dropped: %s", key, path, why)
    return saved


def override_keys(overrides: list[str]) -> list[str]:
    """The dotted keys (or group names) that command-line overrides assign: `+a.b=1` -> `a.b`."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]


def _set(tree: dict, key: str, source: dict) -> None:
    """tree[key] = source[key] for a dotted key, where source has it (a group name like `recipe` has no node)."""
    *parents, last = key.split(".")
    for part in parents:
        if not isinstance(source.get(part), dict):
            return
        source = source[part]
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    if last in source:
        tree[last] = source[last]


_UNSET = object()


def overlay(saved, given, base):
    """`saved` with the values of `given` that differ from `base` on top, node by node (plain containers).

    A key only `saved` has is kept (e.g. a plug-in option added at the start); one only `given` has is taken.
    """
    if not (isinstance(saved, dict) and isinstance(given, dict)):
        return saved if given == base else given
    base = base if isinstance(base, dict) else {}
    merged = dict(saved)
    for key, value in given.items():
        merged[key] = overlay(saved[key], value, base.get(key, _UNSET)) if key in saved else value
    return merged


def rank_log_dir(cfg: DictConfig, rank: int) -> Path:
    """Where rank `rank` > 0 keeps its library logs: outside the run directory, which rank 0 alone writes."""
    return Path(tempfile.gettempdir()) / "rlkit" / str(cfg.logging.run_name) / f"rank{rank}"


def check_run_dir(cfg: DictConfig) -> None:
    """Before any data or model loads: clear stale temp checkpoints; refuse to start over a run's history
    unless logging.overwrite=true (then remove it); on a resume, refuse changes the checkpoint cannot follow."""
    run_dir = run_dir_of(cfg)
    for stale in remove_stale_temps(run_dir / "checkpoints"):
        log.info("removed %s, a checkpoint whose save never completed", stale)
    steps, checkpoints = _logged_steps(run_dir), list_checkpoints(run_dir / "checkpoints")
    resume = cfg.trainer.resume
    if resume is None and (steps or checkpoints):
        if not cfg.logging.overwrite:
            raise ConfigError(
                f"logging.run_name: {run_dir} already holds a run ({steps} logged steps, {len(checkpoints)} "
                f"checkpoints) that this start would overwrite. Fix: continue it with trainer.resume=auto, choose a "
                f"fresh logging.run_name, or replace it with logging.overwrite=true")
        for path in (run_dir / name for name in HISTORY):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        log.info("logging.overwrite=true: removed the earlier run's metrics, samples and checkpoints in %s", run_dir)
    if resume == "auto" and steps and not checkpoints:
        raise ConfigError(
            f"trainer.resume: {run_dir} has {steps} logged steps but no checkpoint to continue from. Fix: start it "
            f"over with logging.overwrite=true (no trainer.resume), or choose a fresh logging.run_name")
    saved = saved_config_path(cfg)
    if saved is not None and saved.is_file():
        check_resume_changes(OmegaConf.load(saved), cfg, saved)
    log.info("run directory: %s", run_dir)


def check_resume_changes(saved: DictConfig, cfg: DictConfig, where: Path) -> None:
    """Refuse a resume that changes a FIXED key of the saved config; log every other change as `old -> new`."""
    old = _leaves(OmegaConf.to_container(saved, resolve=True))
    new = _leaves(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k, _UNSET) != new.get(k, _UNSET) and k not in NOT_DIFFED)
    refused = [(key, reason) for key in changed for fixed, reason in FIXED.items()
               if key == fixed or key.startswith(f"{fixed}.")]
    if refused:
        detail = "; ".join(f"{k} {_show(old, k)} -> {_show(new, k)}: {reason}" for k, reason in refused)
        keys = ", ".join(k for k, _ in refused)
        raise ConfigError(
            f"{keys}: cannot change when resuming the run in {where.parent} ({detail}). Fix: drop these overrides (the "
            f"run's saved config is the base), or start a new run with a fresh logging.run_name")
    for key in changed:
        log.info("resume: %s: %s -> %s", key, _show(old, key), _show(new, key))


def _show(leaves: dict, key: str) -> str:
    return repr(leaves[key]) if key in leaves else "(unset)"


def _leaves(tree: dict, prefix: str = "") -> dict:
    """{dotted path: value} of the non-dict values of a plain config tree (lists are values)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / METRICS_FILE
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0
