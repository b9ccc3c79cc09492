"""The one up-front validation of a composed config: every refusal a config can get before anything heavy starts,
each naming the key and the fix (docs/architecture.md, "Configuration")."""
from __future__ import annotations

import difflib
import inspect
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlkit.config import default_config, known_keys, plug_points, spec_at, unknown_keys
from rlkit.errors import ConfigError, require
from rlkit.launch import launch_problem, world_size
from rlkit.option_types import check_option_types
from rlkit.ranges import check_ranges
from rlkit.registry import PluginSpec, Registry, capabilities_of


def validate(cfg: DictConfig) -> None:
    """Refuse configs that cannot train correctly, before anything heavy starts."""
    from rlkit.algorithms import AGGREGATIONS
    from rlkit.algorithms.losses import entropy_agg_problem
    from rlkit.algorithms.rollout_correction import rollout_correction_problem
    from rlkit.preflight import check_machine
    from rlkit.rollout import ENGINES, engine_target
    from rlkit.reward.verifier_options import check_options
    from rlkit.reward.verifiers import VERIFIERS

    _check_known_keys(cfg)
    a, r, t = cfg.algorithm, cfg.rollout, cfg.trainer
    group_users, on_policy_users, recompute_users = [], [], []
    for key, registry in plug_points().items():
        spec = spec_at(cfg, key)
        _check_plugin(key, registry, spec)
        caps = capabilities_of(registry.get(spec.name))
        if caps.needs_groups:
            group_users.append(f"{key}={spec.name}")
        if caps.needs_on_policy:
            on_policy_users.append(f"{key}={spec.name}")
        if caps.needs_recompute:
            recompute_users.append(f"{key}={spec.name}")
    check_ranges(cfg, default_config())  # every number in its range (rlkit.ranges)
    if on_policy_users and not a.allow_off_policy:
        _check_exact_on_policy(cfg, ", ".join(on_policy_users))
    _check_sampler_inputs(cfg)
    _check_launch(cfg)
    if t.max_staleness:
        _check_async(cfg, ", ".join(on_policy_users))
    engine = spec_at(cfg, "rollout.engine")
    try:
        target = engine_target(engine.name)
    except KeyError as err:
        raise ConfigError(f"rollout.engine={engine.name}: {err.args[0]}") from None
    _check_plugin("rollout.engine", ENGINES, PluginSpec(target, engine.options))
    verifier = spec_at(cfg, "reward.verifier")
    try:
        check_options(verifier.name, VERIFIERS.get(verifier.name), verifier.options)
    except KeyError as err:
        raise ConfigError(f"reward.verifier={verifier.name}: {err.args[0]}") from None
    except TypeError as err:
        raise ConfigError(f"reward.verifier.options: {err}. Fix: remove or correct the option "
                          f"(+reward.verifier.options.KEY=VALUE adds one)") from None
    require(r.n >= 2 or not group_users, "rollout.n",
             f"{', '.join(group_users)} compares responses within a group but n={r.n}", "set rollout.n>=2")
    require(a.loss.agg in AGGREGATIONS, "algorithm.loss.agg", f"unknown aggregation {a.loss.agg!r}",
             f"use one of {list(AGGREGATIONS)}")
    if problem := entropy_agg_problem(a.loss.get("entropy_agg"), a.loss.agg, spec_at(cfg, "algorithm.token_mask").name):
        raise ConfigError(problem)
    batch = t.prompts_per_step * r.n
    require(batch % t.mini_batches == 0, "trainer.mini_batches",
             f"the rollout batch ({t.prompts_per_step} prompts x {r.n} = {batch}) must split evenly into "
             f"{t.mini_batches} mini-batches", "choose a divisor of prompts_per_step*rollout.n")
    require(t.micro_batch_size is not None or t.micro_batch_tokens is not None, "trainer.micro_batch_tokens",
             "and trainer.micro_batch_size are both null: a micro-batch would be the whole mini-batch, its memory "
             "unbounded", "set trainer.micro_batch_tokens (e.g. 768) or trainer.micro_batch_size (e.g. 8)")
    require(not (t.shared_prompt_forward and cfg.model.gradient_checkpointing), "trainer.shared_prompt_forward",
             "reads the prompts' KV cache, which gradient checkpointing drops in training",
             "set trainer.shared_prompt_forward=false or model.gradient_checkpointing=false")
    require(t.async_schedule in ("eager", "fixed"), "trainer.async_schedule",
             f"unknown schedule {t.async_schedule!r}", "use fixed (reproducible) or eager (docs/async.md)")
    require(t.logprob_head_recompute in ("auto", "always", "never"), "trainer.logprob_head_recompute",
             f"unknown value {t.logprob_head_recompute!r}", "use auto, always or never")
    require(t.old_logprobs in ("behavior", "recompute"), "trainer.old_logprobs",
             f"unknown value {t.old_logprobs!r}", "use behavior or recompute")
    require(t.old_logprobs == "recompute" or not recompute_users, "trainer.old_logprobs",
             f"{', '.join(recompute_users)} compares the trainer's recomputed old logprobs with the engine's, but "
             f"old_logprobs={t.old_logprobs} takes the engine's as old (every ratio would be 1)",
             "set trainer.old_logprobs=recompute (or algorithm.rollout_correction=none)")
    correction = spec_at(cfg, "algorithm.rollout_correction")
    if problem := rollout_correction_problem(correction.name, correction.options):
        raise ConfigError(problem)
    require(t.resume in (None, "auto") or Path(str(t.resume)).is_dir(), "trainer.resume",
             f"{t.resume} is not a directory", "use null, auto, or a path to runs/<name>/checkpoints/step_N")
    require(cfg.data.source == "arithmetic" or not cfg.data.options, "data.options",
             f"generator options apply only to the arithmetic source, not {cfg.data.source}",
             "load a file or HF dataset with data=file data.source=PATH_OR_NAME (data.prompt_column=..., "
             "data.answer_column=...)")
    check_machine(cfg)
    _check_lora(cfg)


def _check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys no part of rlkit reads (a `+key=value` with a typo would otherwise be ignored)."""
    tree = OmegaConf.to_container(cfg, resolve=False)
    if not unknown_keys(tree, known_keys()):
        return
    unknown = unknown_keys(tree, known_keys(every_choice=True))  # a key of a non-default choice is fine
    if not unknown:
        return
    key = unknown[0]
    close = difflib.get_close_matches(key, sorted(known_keys(every_choice=True)), n=1, cutoff=0.6)
    fix = (f"did you mean {close[0]}? Set {close[0]}=VALUE (a leading + adds a new key, which nothing reads)"
           if close else "remove it; every key rlkit reads is commented in configs/ "
                         "(python -m rlkit.train --cfg job prints them)")
    raise ConfigError(f"{key}: no part of rlkit reads this key. Fix: {fix}")


def _check_sampler_inputs(cfg: DictConfig) -> None:
    """What every plug-in reads from the batch's two method bags (`needs_inputs`: estimator_inputs,
    `needs_extras`: extras) must be among what the sampler provides (`provides_inputs`, `provides_extras`)."""
    points = plug_points()
    samplers = points["algorithm.sampler"]
    sampler = spec_at(cfg, "algorithm.sampler").name

    def provided(name: str) -> set[str]:
        caps = capabilities_of(samplers.get(name))
        return set(caps.provides_inputs) | set(caps.provides_extras)

    for key, registry in points.items():
        name = spec_at(cfg, key).name
        caps = capabilities_of(registry.get(name))
        missing = [x for x in (*caps.needs_inputs, *caps.needs_extras) if x not in provided(sampler)]
        if missing:
            able = [s for s in samplers.names() if set(missing) <= provided(s)]
            raise ConfigError(f"{key}={name}: reads {', '.join(missing)} from the sampler, which "
                              f"algorithm.sampler={sampler} does not provide. Fix: set algorithm.sampler="
                              f"{' or '.join(able) or 'a sampler that provides them'} (or choose another {key})")


def _check_lora(cfg: DictConfig) -> None:
    """model.lora: the targets exist in the model (built on the meta device from its config: no weights load), and
    no plug-in reads what LoRA leaves without state (ranges and the FSDP2 refusal are checked with the others)."""
    if not cfg.model.lora.enabled:
        return
    for key, registry in plug_points().items():
        name = spec_at(cfg, key).name
        require(not capabilities_of(registry.get(name)).reads_optimizer_state, key,
                f"{name} reads the optimizer's per-parameter state, which with LoRA exists only for the adapter "
                "(the base model, LM head included, is frozen)", f"train {key}={name} without LoRA "
                "(model.lora.enabled=false), or choose another plug-in")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlkit.models.lora import targets_problem

    try:
        model_config = AutoConfig.from_pretrained(cfg.model.path)
    except (OSError, ValueError):  # check_machine accepted the path (a hub name to fetch): checked again at load
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    targets = cfg.model.lora.target_modules
    targets = None if targets is None else OmegaConf.to_container(targets, resolve=True) \
        if not isinstance(targets, str) else targets
    if problem := targets_problem(model, targets):
        raise ConfigError(problem)


def _check_launch(cfg: DictConfig) -> None:
    """`rlkit.launch.launch_problem` of the config under this job's launch, raised."""
    plugins = {key: (spec_at(cfg, key).name, capabilities_of(registry.get(spec_at(cfg, key).name)))
               for key, registry in plug_points().items()}
    if problem := launch_problem(cfg, plugins):
        raise ConfigError(problem)


def _check_exact_on_policy(cfg: DictConfig, users: str) -> None:
    """One optimizer step per rollout batch, no KL to a reference, no entropy bonus: what exact on-policy assumes."""
    t, fix = cfg.trainer, "or set algorithm.allow_off_policy=true to accept the mismatch knowingly"
    require(t.ppo_epochs == 1, "trainer.ppo_epochs", f"{users} assumes exactly on-policy updates (one optimizer "
             f"step per rollout batch) but ppo_epochs={t.ppo_epochs}", f"set trainer.ppo_epochs=1, {fix}")
    require(t.mini_batches == 1, "trainer.mini_batches", f"{users} assumes exactly on-policy updates (one optimizer "
             f"step per rollout batch) but mini_batches={t.mini_batches}", f"set trainer.mini_batches=1, {fix}")
    loss = cfg.algorithm.loss
    require(loss.kl_coef == 0, "algorithm.loss.kl_coef", f"{users} assumes exactly on-policy updates "
             f"without a reference model or KL term but kl_coef={loss.kl_coef}", f"set algorithm.loss.kl_coef=0, {fix}")
    require(loss.entropy_coef == 0, "algorithm.loss.entropy_coef", f"{users} follows a method without an entropy bonus "
             f"but entropy_coef={loss.entropy_coef}", f"set algorithm.loss.entropy_coef=0, {fix}")


def _check_async(cfg: DictConfig, on_policy_users: str) -> None:
    """What trainer.max_staleness >= 1 needs (docs/async.md): a separate server engine, one process, no plug-in
    that assumes exact on-policy data, no sampler that reads the learner's live model while collecting."""
    k, engine = cfg.trainer.max_staleness, spec_at(cfg, "rollout.engine").name
    fix = "or set trainer.max_staleness=0 (the synchronous loop)"
    require(not on_policy_users or cfg.algorithm.allow_off_policy, "trainer.max_staleness",
            f"{on_policy_users} needs exactly on-policy data (needs_on_policy) but max_staleness={k} trains samples "
            f"up to {k} updates old", f"set trainer.max_staleness=0, or algorithm.allow_off_policy=true to accept "
            f"the mismatch knowingly")
    require(engine == "vllm_server", "trainer.max_staleness",
            f"rollout.engine={engine} generates in the training process, on the same CPU threads or GPU as the "
            f"update, so a producer thread would only take turns with it", f"use rollout=vllm_server (a separate "
            f"`vllm serve` process that generates while the learner trains), {fix}")
    require(world_size() == 1, "trainer.max_staleness",
            f"async rollouts run in one process; this job has {world_size()} (every rank would have to agree on "
            f"when each batch is taken and pushed, which is not built)", f"launch one process, {fix}")
    sampler = spec_at(cfg, "algorithm.sampler")
    if sampler.name == "fr3e" and sampler.options.get("branch_score", "entropy") == "entropy":
        raise ConfigError(f"algorithm.sampler.options.branch_score: fr3e's entropy scoring runs the learner's live "
                          f"model while it collects, which trains at the same time under trainer.max_staleness={k}. "
                          f"Fix: set algorithm.sampler.options.branch_score=surprisal (the engine's logprobs of the "
                          f"sampled tokens) or paragraph, {fix}")
    loss = spec_at(cfg, "algorithm.policy_loss")
    if loss.name not in ("ppo_clip", "critique"):  # both clip the ratio to the behaviour policy
        warnings.warn(f"algorithm.policy_loss={loss.name}: with trainer.max_staleness={k} samples are up to {k} "
                      f"updates off-policy; rlkit cannot tell whether this loss bounds the ratio to the behaviour "
                      f"policy (ppo_clip and critique do). Unclipped, a stale sample's ratio is unbounded",
                      stacklevel=2)


def _check_plugin(key: str, registry: Registry, spec: PluginSpec) -> None:
    """Option names against the plug-in's signature, values against its annotations (rlkit.option_types)."""
    try:
        registry.check_options(key, spec)
        impl = registry.get(spec.name)
        check_option_types(impl.__init__ if inspect.isclass(impl) else impl, spec.options,
                           f"{registry.kind} {spec.name!r}", f"{key}.options.", strict=False)
    except KeyError as err:
        raise ConfigError(f"{key}={spec.name}: {err.args[0]}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None
