"""One convention for every plug point (docs/architecture.md, "Plug points").

A plug point is a `Registry` of named implementations. A config names one as a bare name
(``algorithm.advantage=opo``: its default options) or as ``{name: NAME, options: {...}}``;
``build`` turns that into a `Plugin` once, at start. An implementation is either

- a function whose keyword-only parameters are its options (the registry's ``inputs`` are
  the arguments the caller fills in and never options), or
- a class whose ``__init__`` keywords are its options; its instances are called like the
  function and may hold state: ``state_dict()``/``load_state_dict(state)`` (saved in
  checkpoints), ``after_optimizer_step()`` (called after every optimizer step) and ``step_metrics()``
  (a dict of floats logged with the step's metrics, e.g. ``{"capo/rejected_frac": 0.07}``).

What a plug-in needs from the rest of the run is declared on it (`Capabilities`), never
inferred from its name. User code plugs in by import path, ``"my_pkg.my_mod:my_fn"``.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Mapping, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Capabilities:
    """What a plug-in requires; read generically by config validation and the trainer.

    needs_groups: compares samples within a group, so ``rollout.n >= 2``.
    needs_hidden: reads the final hidden states of the trainer's forward (token masks).
    needs_reference: reads logprobs of the frozen initial policy (a reference model is loaded).
    needs_on_policy: assumes exactly on-policy updates (one optimizer step per rollout batch, no KL):
        validation refuses other settings unless ``algorithm.allow_off_policy=true``.
    needs_inputs: per-sample tensors read from ``RolloutBatch.estimator_inputs``; validation refuses a
        sampler that does not declare them in its ``provides_inputs``.
    provides_inputs: the ``estimator_inputs`` a sampler adds to every batch.
    needs_extras / provides_extras: the same for ``RolloutBatch.extras`` (per-sample tensors a policy loss or
        token mask reads, e.g. Critique-GRPO's ``is_refinement``).
    single_process: keeps state updated from one process's data (a plug-in whose state is not reduced over
        ranks); validation refuses it in a job of several processes.
    reads_lm_head / reads_optimizer_state: reads the whole output embedding [V,d] (`TokenMaskInputs.lm_head`) or
        the optimizer's per-parameter state; validation refuses either under FSDP2, which shards both over the ranks.
    needs_recompute: compares the trainer's recomputed old logprobs with the engine's behaviour logprobs (a rollout
        correction); validation refuses it unless ``trainer.old_logprobs=recompute``.
    """

    needs_groups: bool = False
    needs_hidden: bool = False
    needs_reference: bool = False
    needs_on_policy: bool = False
    needs_inputs: tuple[str, ...] = ()
    provides_inputs: tuple[str, ...] = ()
    needs_extras: tuple[str, ...] = ()
    provides_extras: tuple[str, ...] = ()
    single_process: bool = False
    reads_lm_head: bool = False
    reads_optimizer_state: bool = False
    needs_recompute: bool = False


def declare(**capabilities) -> Callable[[T], T]:
    """Decorator for user plug-ins: ``@declare(needs_groups=True)``."""
    caps = Capabilities(**capabilities)

    def decorator(obj: T) -> T:
        obj.capabilities = caps
        return obj

    return decorator


def capabilities_of(obj: object) -> Capabilities:
    caps = getattr(obj, "capabilities", None)
    return caps if isinstance(caps, Capabilities) else Capabilities()


@dataclass(frozen=True)
class PluginSpec:
    """A plug point's configured choice: a registered name or import path, and its options."""

    name: str
    options: dict = field(default_factory=dict)


def plugin_spec(value: Any, key: str) -> PluginSpec:
    """``"grpo"`` or ``{name: grpo, options: {...}}`` (any Mapping) -> PluginSpec; ValueError naming `key` otherwise."""
    if isinstance(value, str) and value:
        return PluginSpec(value)
    if isinstance(value, Mapping) and isinstance(value.get("name"), str) and set(value) <= {"name", "options"}:
        options = value.get("options") or {}
        if isinstance(options, Mapping):
            return PluginSpec(value["name"], dict(options))
    if isinstance(value, Mapping) and "name" not in value:
        raise ValueError(
            f"{key}: has options but no plug-in name ({value!r}; a bare `{key}=NAME` override drops the options "
            f"block and a later `+{key}.options...` cannot restore the name). "
            f"Fix: {key}.name=NAME +{key}.options.KEY=VALUE"
        )
    raise ValueError(
        f"{key}: expected a plug-in name or {{name: NAME, options: {{...}}}}, got {value!r}. "
        f"Fix: e.g. {key}=NAME, or {key}.name=NAME +{key}.options.KEY=VALUE"
    )


class Plugin:
    """A built plug-in: call it with the plug point's inputs; its options are already bound."""

    def __init__(self, name: str, impl: Callable, options: dict, capabilities: Capabilities):
        self.name = name
        self.impl = impl
        self.options = options  # bound at call time for functions; {} for class instances
        self.capabilities = capabilities

    def __call__(self, *args, **kwargs):
        return self.impl(*args, **kwargs, **self.options)

    @property
    def stateful(self) -> bool:
        return hasattr(self.impl, "state_dict")

    def state_dict(self) -> dict:
        return self.impl.state_dict() if self.stateful else {}

    def load_state_dict(self, state: dict) -> None:
        if self.stateful:
            self.impl.load_state_dict(state)

    def after_optimizer_step(self) -> None:
        hook = getattr(self.impl, "after_optimizer_step", None)
        if hook is not None:
            hook()

    def step_metrics(self) -> dict[str, float]:
        """What a class plug-in reports about the step just taken (e.g. a mask's rejected fraction), then resets."""
        report = getattr(self.impl, "step_metrics", None)
        return report() if report is not None else {}


class Registry(Generic[T]):
    """A dict of named implementations with a conflict guard, a helpful miss and option checks.

    `inputs` names the arguments the caller passes (never options), e.g. ``("rewards", "group_ids", ...)``.
    """

    def __init__(self, kind: str, inputs: tuple[str, ...] = ()):
        self.kind = kind
        self.inputs = inputs
        self._items: dict[str, T] = {}

    def register(self, name: str, **capabilities) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            known = self._items.get(name)
            if known is not None and known is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered to {known!r}")
            if capabilities:
                obj.capabilities = Capabilities(**capabilities)
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                return getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise KeyError(f"cannot import {self.kind} {name!r}: {err}") from err
        close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.6)
        raise KeyError(
            f"unknown {self.kind} {name!r}{f'; did you mean {close[0]!r}?' if close else ''} "
            f"known: {', '.join(self.names())} (or give an import path 'package.module:function')"
        )

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def option_names(self, name: str) -> tuple[list[str], list[str], bool]:
        """(accepted options, required options, takes any **options) of the implementation `name`."""
        return option_names(self.get(name), self.inputs)

    def check_options(self, key: str, spec: PluginSpec) -> None:
        """ValueError naming `key`, the plug-in and its accepted options if `spec.options` cannot be bound."""
        accepted, required, takes_any = self.option_names(spec.name)
        for option in spec.options:
            if option in self.inputs:
                raise ValueError(f"{key}.options.{option}: is filled in by rlkit, not configured. "
                                 f"Fix: remove it: ~{key}.options.{option}")
            if not takes_any and option not in accepted:
                raise ValueError(f"{key}.options.{option}: {self.kind} {spec.name!r} takes no option {option!r} "
                                 f"(it takes {accepted}). Fix: remove it (~{key}.options.{option}) or spell it as one of those")
        missing = [o for o in required if o not in spec.options]
        if missing:
            raise ValueError(f"{key}.options: {self.kind} {spec.name!r} needs {missing}. "
                             f"Fix: set {key}.options.{missing[0]}=VALUE")

    def build(self, spec: PluginSpec) -> Plugin:
        """The configured plug-in: a class is instantiated with the options; a function gets them at each call."""
        impl = self.get(spec.name)
        caps = capabilities_of(impl)
        if inspect.isclass(impl):
            return Plugin(spec.name, impl(**spec.options), {}, caps)
        return Plugin(spec.name, impl, dict(spec.options), caps)


def option_names(impl: Callable, inputs: tuple[str, ...]) -> tuple[list[str], list[str], bool]:
    """Options of a plug-in: keyword-only parameters of a function, keywords of a class's __init__."""
    target = impl.__init__ if inspect.isclass(impl) else impl
    params = list(inspect.signature(target).parameters.values())
    if inspect.isclass(impl):
        params = [p for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    else:
        params = [p for p in params if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind is not p.VAR_KEYWORD and p.name not in inputs]
    return [p.name for p in named], [p.name for p in named if p.default is p.empty], takes_any


__all__ = ["Capabilities", "Plugin", "PluginSpec", "Registry", "capabilities_of", "declare", "plugin_spec",
           "option_names"]
