"""The allowed range of every numeric config key, in one table, checked once at validation.

Keys are dotted paths; a `*` segment matches any one key (`eval.suite.*.limit`). A plug-in option's range
(`algorithm.advantage.options.eps`) holds for the built-in plug-ins; a plug-in named by import path checks
its own options. Relations between keys (a batch that splits into mini-batches) stay in rlkit.config.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig, OmegaConf

from rlkit.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """A number in [low, high] (an end is excluded when *_open); None allowed if `null`; `off` an extra value;
    `word` an extra string."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    null: bool = False
    off: int | None = None
    word: str | None = None  # a word allowed besides the numbers ("auto")
    items: bool = False  # a list of such numbers (or one) is allowed

    def allows(self, value: object) -> bool:
        if isinstance(value, list):
            return self.items and all(self.allows(item) for item in value)
        if self.word is not None and value == self.word:
            return True
        if value is None or type(value) is bool or not isinstance(value, (int, float)):
            return value is None and self.null
        if value == self.off and type(value) is int:
            return True
        if self.integer and type(value) is not int or not math.isfinite(value):
            return False
        above = self.low is None or value > self.low or value == self.low and not self.low_open
        below = self.high is None or value < self.high or value == self.high and not self.high_open
        return above and below

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            bounds = f" in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bounds = f" {'>' if self.low_open else '>='} {_show(self.low)}"
        else:
            bounds = f" {'<' if self.high_open else '<='} {_show(self.high)}" if self.high is not None else ""
        extras = [f"{self.off} (off)"] * (self.off is not None) + [self.word] * (self.word is not None) + ["null"] * self.null
        text = kind + bounds + "".join(f" or {extra}" for extra in extras)
        return f"{text} (or a list of them)" if self.items else text


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else str(bound)


COUNT, COUNT0 = Range(1, integer=True), Range(0, integer=True)  # integers >= 1, >= 0
POSITIVE, NONNEGATIVE = Range(0, low_open=True), Range(0)  # numbers > 0, >= 0
FRACTION = Range(0, 1, low_open=True)  # (0, 1]: nucleus mass, GPU memory share
TOP_K = Range(1, integer=True, off=-1)
SEED = Range(0, 2**32 - 1, integer=True)
INT = Range(integer=True)
GENERATOR = {"min_value": INT, "max_value": INT, "terms": Range(2, integer=True)}  # the arithmetic source's options

RANGES: dict[str, Range] = {
    "seed": SEED,
    "model.lora.r": COUNT, "model.lora.alpha": POSITIVE, "model.lora.dropout": Range(0, 1, high_open=True),
    **{f"{prefix}.limit": Range(1, integer=True, null=True) for prefix in ("data", "eval.suite.*", "eval.file")},
    **{f"{prefix}.options.{key}": r for prefix in ("data", "eval.suite.*") for key, r in GENERATOR.items()},
    "rollout.n": COUNT, "rollout.temperature": POSITIVE, "rollout.top_p": FRACTION, "rollout.top_k": TOP_K,
    "rollout.max_tokens": COUNT,
    "rollout.engine.options.max_model_len": COUNT, "rollout.engine.options.seed": SEED,
    "rollout.engine.options.gpu_memory_utilization": FRACTION,
    "rollout.engine.options.kv_cache_gib": Range(0, low_open=True, null=True, word="auto"),
    "rollout.engine.options.port": Range(1, 65535, integer=True, null=True),
    "rollout.engine.options.timeout_s": POSITIVE, "rollout.engine.options.start_timeout_s": POSITIVE,
    "rollout.engine.options.max_concurrency": COUNT,
    "rollout.engine.options.max_num_seqs": Range(1, integer=True, null=True),
    "reward.num_workers": COUNT0, "reward.timeout_s": POSITIVE, "reward.request_timeout_s": POSITIVE,
    "reward.retries": COUNT0, "reward.batch_size": COUNT,
    "algorithm.max_sample_rounds": COUNT,
    "algorithm.loss.kl_coef": NONNEGATIVE, "algorithm.loss.entropy_coef": NONNEGATIVE,
    "algorithm.loss.loss_scale_factor": Range(0, low_open=True, null=True),
    "algorithm.sampler.options.k": COUNT, "algorithm.sampler.options.base_n": COUNT,
    "algorithm.sampler.options.c_max": COUNT, "algorithm.sampler.options.w_max": COUNT,
    "algorithm.sampler.options.max_state_rounds": COUNT, "algorithm.sampler.options.max_model_len": COUNT,
    "algorithm.reward_shaper.options.lam": Range(0, 1), "algorithm.reward_shaper.options.alpha": NONNEGATIVE,
    "algorithm.reward_shaper.options.max_response_len": COUNT, "algorithm.reward_shaper.options.buffer_len": COUNT,
    "algorithm.reward_shaper.options.penalty_factor": NONNEGATIVE,
    "algorithm.group_filter.options.tol": NONNEGATIVE,
    "algorithm.advantage.options.eps": NONNEGATIVE, "algorithm.advantage.options.tol": NONNEGATIVE,
    "algorithm.advantage.options.sharpen": Range(0, low_open=True, null=True),
    "algorithm.token_mask.options.top_k": COUNT, "algorithm.token_mask.options.tau_h": NONNEGATIVE,
    "algorithm.token_mask.options.tau_f": NONNEGATIVE,
    "algorithm.policy_loss.options.eps_low": Range(0, 1), "algorithm.policy_loss.options.eps_high": NONNEGATIVE,
    "algorithm.policy_loss.options.dual_clip_c": Range(1, low_open=True, null=True),
    "algorithm.policy_loss.options.gamma": POSITIVE,
    "trainer.total_steps": COUNT, "trainer.max_generated_tokens": Range(1, integer=True, null=True),
    "trainer.prompts_per_step": COUNT, "trainer.ppo_epochs": COUNT, "trainer.mini_batches": COUNT,
    "trainer.micro_batch_size": Range(1, integer=True, null=True), "trainer.micro_batch_tokens": Range(1, integer=True, null=True),
    "trainer.logprob_chunk_tokens": COUNT, "trainer.lr": POSITIVE,
    "trainer.weight_decay": NONNEGATIVE, "trainer.betas": Range(0, 1, high_open=True, items=True),
    "trainer.max_grad_norm": Range(0, low_open=True, null=True), "trainer.warmup_steps": COUNT0,
    "trainer.max_staleness": COUNT0, "trainer.save_every": COUNT0, "trainer.keep_last": COUNT, "trainer.eval_every": COUNT0,
    "trainer.collective_timeout_s": POSITIVE,
    "logging.console_every": COUNT0, "logging.samples_per_step": COUNT0,
    "eval.n": COUNT, "eval.k": Range(1, integer=True, items=True), "eval.temperature": NONNEGATIVE, "eval.top_p": FRACTION, "eval.top_k": TOP_K,
    "eval.max_tokens": Range(1, integer=True, null=True), "eval.limit": Range(1, integer=True, null=True),
    "eval.seed": SEED, "eval.batch_size": COUNT,
}


def range_of(key: str) -> Range | None:
    """The entry of RANGES whose pattern matches the dotted `key`, if any."""
    if key in RANGES:
        return RANGES[key]
    parts = key.split(".")
    for pattern, allowed in RANGES.items():
        segments = pattern.split(".")
        if len(segments) == len(parts) and all(s in ("*", p) for s, p in zip(segments, parts)):
            return allowed
    return None


def check_ranges(node: DictConfig, defaults: dict, prefix: str = "") -> None:
    """ConfigError `<key>: must be <range>, got <value>. Fix: ...` for the first value of the config `node` outside
    its key's range; the fix quotes the key's value in `defaults` (a plain tree). An interpolated value
    (`${seed}`) is checked where it is written."""
    for key in node:
        path, default = f"{prefix}{key}", defaults.get(key) if isinstance(defaults, dict) else None
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            if not (key == "options" and ":" in str(node.get("name"))):  # a user plug-in checks its own
                check_ranges(value, default, f"{path}.")
            continue
        value = OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
        allowed = range_of(path)
        if allowed is not None and not allowed.allows(value):
            example = f" (default: {default!r})" if allowed.allows(default) else ""
            raise ConfigError(f"{path}: must be {allowed}, got {value!r}. Fix: set {path} to {allowed}{example}")
