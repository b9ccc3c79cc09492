"""Config resolvers and the one up-front validation of a composed config (DESIGN.md §3)."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def cache_dir() -> str:
    return os.environ.get("RLKIT_CACHE") or str(Path.home() / ".cache" / "rlkit")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("rlkit_cache"):
        OmegaConf.register_new_resolver("rlkit_cache", cache_dir)
    if not OmegaConf.has_resolver("floordiv"):
        OmegaConf.register_new_resolver("floordiv", lambda a, b: max(1, int(a) // int(b)))


def compose(overrides: list[str] = ()) -> DictConfig:
    """The config `python -m rlkit.train OVERRIDES...` would run, for use from Python (tests, notebooks)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def validate(cfg: DictConfig) -> None:
    """Refuse configs that cannot train correctly, before anything heavy starts."""
    from rlkit.algorithms import ADVANTAGES, AGGREGATIONS, SHAPERS
    from rlkit.algorithms.plugins import POLICY_LOSSES, TOKEN_MASKS
    from rlkit.group_filters import GROUP_FILTERS
    from rlkit.reward.verifiers import VERIFIERS
    from rlkit.rollout import ENGINES, engine_names
    from rlkit.sampling import SAMPLERS

    a, r, t = cfg.algorithm, cfg.rollout, cfg.trainer
    for key, registry, name in (
        ("algorithm.sampler", SAMPLERS, a.sampler),
        ("algorithm.advantage", ADVANTAGES, a.advantage),
        ("algorithm.reward_shaper", SHAPERS, a.reward_shaper),
        ("algorithm.group_filter", GROUP_FILTERS, a.group_filter),
        ("algorithm.token_mask", TOKEN_MASKS, a.token_mask),
        ("algorithm.loss.name", POLICY_LOSSES, a.loss.name),
        ("reward.verifier", VERIFIERS, cfg.reward.verifier),
    ):
        try:
            registry.get(name)
        except KeyError as err:
            raise ConfigError(f"{key}={name}: {err.args[0]}") from None
    _check_options("algorithm.advantage_options", ADVANTAGES.get(a.advantage), a.advantage_options,
                   fixed=("rewards", "group_ids", "response_mask", "scorable"))
    _check_options("algorithm.reward_shaper_options", SHAPERS.get(a.reward_shaper), a.reward_shaper_options,
                   fixed=("rewards", "correct", "lengths", "group_ids"))
    _require(r.engine in engine_names() or ":" in r.engine or r.engine in ENGINES, "rollout.engine",
             f"unknown engine {r.engine!r}", f"use one of {engine_names()} or 'package.module:EngineClass'")
    if a.advantage in GROUP_ESTIMATORS:
        _require(r.n >= 2, "rollout.n", f"{a.advantage} compares responses within a group but n={r.n}",
                 "set rollout.n>=2")
    _require(a.loss.agg in AGGREGATIONS, "algorithm.loss.agg", f"unknown aggregation {a.loss.agg!r}",
             f"use one of {list(AGGREGATIONS)}")
    _require(r.temperature > 0, "rollout.temperature", "must be > 0 for on-policy sampling", "set e.g. 1.0")
    _require(r.max_tokens >= 1, "rollout.max_tokens", "must be >= 1", "set e.g. 128")
    _require(t.prompts_per_step >= 1, "trainer.prompts_per_step", "must be >= 1", "set e.g. 8")
    batch = t.prompts_per_step * r.n
    _require(t.mini_batches >= 1 and batch % t.mini_batches == 0, "trainer.mini_batches",
             f"the rollout batch ({t.prompts_per_step} prompts x {r.n} = {batch}) must split evenly into "
             f"{t.mini_batches} mini-batches", "choose a divisor of prompts_per_step*rollout.n")
    _require(t.ppo_epochs >= 1, "trainer.ppo_epochs", "must be >= 1", "set 1 for exactly on-policy updates")
    _require(t.micro_batch_size >= 1, "trainer.micro_batch_size", "must be >= 1", "set e.g. 16")
    _require(t.old_logprobs in ("behavior", "recompute"), "trainer.old_logprobs",
             f"unknown value {t.old_logprobs!r}", "use behavior or recompute")
    _require(a.loss.kl_coef >= 0 and a.loss.entropy_coef >= 0, "algorithm.loss.kl_coef/entropy_coef",
             "coefficients must be >= 0", "set 0 to turn a term off")
    _require(a.max_sample_rounds >= 1, "algorithm.max_sample_rounds", "must be >= 1", "set 1 without a group filter")
    _require(t.resume in (None, "auto") or Path(str(t.resume)).is_dir(), "trainer.resume",
             f"{t.resume} is not a directory", "use null, auto, or a path to runs/<name>/checkpoints/step_N")
    _require(cfg.data.source == "arithmetic" or not cfg.data.options, "data.options",
             f"generator options apply only to the arithmetic source, not {cfg.data.source}",
             "load a file or HF dataset with data=file data.source=PATH_OR_NAME (data.prompt_column=..., "
             "data.answer_column=...)")
    _check_model_path(cfg.model.path)


def _check_options(key: str, fn, options, *, fixed: tuple[str, ...]) -> None:
    """Every configured option must be a keyword the plug-in accepts (and not one the trainer passes)."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in options:
        _require(name not in fixed, f"{key}.{name}", "is filled in by the trainer", f"remove it: ~{key}.{name}")
        _require(takes_any or name in params, f"{key}.{name}", f"{fn.__name__} takes no option {name!r} "
                 f"(it takes {[p for p in params if p not in fixed]})", f"remove it: ~{key}.{name}")


def _check_model_path(path: str) -> None:
    local = Path(path).expanduser()
    if local.exists():
        _require((local / "config.json").is_file(), "model.path", f"{path} has no config.json",
                 "point model.path at a Hugging Face model directory")
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    _require(not looks_local and not offline, "model.path", f"{path} does not exist"
             + (" and HF_HUB_OFFLINE is set" if offline else ""),
             "run `make setup` to prepare the default SmolLM2-135M-Instruct, or set model.path=<local dir or HF name>")
