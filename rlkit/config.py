"""Config composition, resolvers, the keys rlkit reads and plug-in specs (docs/architecture.md); the up-front
validation of a composed config is `rlkit.validation`."""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rlkit.errors import ConfigError
from rlkit.registry import Plugin, PluginSpec, Registry, plugin_spec

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def cache_dir() -> str:
    return os.environ.get("RLKIT_CACHE") or str(Path.home() / ".cache" / "rlkit")


def plugin_name(node) -> str:
    """`${plugin_name:${algorithm.advantage}}`: a plug-in's name as a word a shell and Hydra accept (`pkg.mod:fn`: fn)."""
    name = node if isinstance(node, str) else node.get("name") or "run"
    return re.sub(r"[^\w.-]+", "_", str(name).rpartition(":")[2])


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("plugin_name"):
        OmegaConf.register_new_resolver("plugin_name", plugin_name)
    if not OmegaConf.has_resolver("rlkit_cache"):
        OmegaConf.register_new_resolver("rlkit_cache", cache_dir)
    if not OmegaConf.has_resolver("floordiv"):
        OmegaConf.register_new_resolver("floordiv", lambda a, b: max(1, int(a) // int(b)))


def compose(overrides: list[str] = ()) -> DictConfig:
    """The config `python -m rlkit.train OVERRIDES...` would run, for use from Python (tests, notebooks).

    Inside a running `@hydra.main` app (the entry point), Hydra is already set up on CONFIG_DIR and is used as is.
    """
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        return hydra_compose("config", overrides=list(overrides))
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


@functools.lru_cache(maxsize=1)
def default_config() -> dict:
    """The config composed without overrides, interpolations as written (a plain dict; composed once)."""
    return OmegaConf.to_container(compose(), resolve=False)


def default_choices(config_dir: Path = Path(CONFIG_DIR)) -> dict[str, str]:
    """{group: default choice} from the defaults list of config.yaml."""
    choices = {}
    for entry in OmegaConf.to_container(OmegaConf.load(config_dir / "config.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            for group, choice in entry.items():
                group = group.removeprefix("optional ").split("@")[0].strip()
                if not group.startswith("override ") and isinstance(choice, str):
                    choices[group] = choice
    return choices


# Groups that no default selects; a choice is added with +GROUP=NAME.
OPTIONAL_GROUPS = ("recipe",)


@functools.lru_cache(maxsize=2)
def known_keys(every_choice: bool = False) -> frozenset[str]:
    """Dotted paths of every node the config files define: of the default composition, or of the union over
    every choice of every group and every recipe (slower: one composition each)."""
    trees = [default_config()]
    if every_choice:
        root = Path(CONFIG_DIR)
        choices = [f"{group}={f.stem}" for group, default in default_choices(root).items()
                   for f in sorted((root / group).glob("*.yaml")) if f.stem != default]
        choices += [f"+{group}={f.stem}" for group in OPTIONAL_GROUPS for f in sorted((root / group).glob("*.yaml"))]
        trees += [OmegaConf.to_container(compose([choice]), resolve=False) for choice in choices]
    return frozenset(path for tree in trees for path in _node_paths(tree))


def _node_paths(tree: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in tree.items():
        paths.append(f"{prefix}{key}")
        if isinstance(value, dict):
            paths += _node_paths(value, f"{prefix}{key}.")
    return paths


# Subtrees whose keys the user chooses: plug-in and loader options (checked against the plug-in's signature
# or by the loader) and the entries of eval.suite (+eval.suite.NAME={...} adds a benchmark).
FREE_KEYS = "options"
USER_ENTRIES = "eval.suite"


def unknown_keys(tree: dict, known: frozenset[str], prefix: str = "") -> list[str]:
    """Dotted paths in `tree` that no config file defines, outside the free-form subtrees (top-most only)."""
    found = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key == FREE_KEYS or (prefix == f"{USER_ENTRIES}." and path not in known):
            continue
        if path not in known:
            found.append(path)
        elif isinstance(value, dict):
            found += unknown_keys(value, known, f"{path}.")
    return found


def plug_points() -> dict[str, Registry]:
    """Config key -> registry of every algorithm plug point (the engine and verifier are checked beside them)."""
    from rlkit.algorithms import ADVANTAGES, ROLLOUT_CORRECTIONS, SHAPERS
    from rlkit.algorithms.plugins import POLICY_LOSSES, TOKEN_MASKS
    from rlkit.sampling import GROUP_FILTERS, SAMPLERS

    return {
        "algorithm.sampler": SAMPLERS,
        "algorithm.reward_shaper": SHAPERS,
        "algorithm.group_filter": GROUP_FILTERS,
        "algorithm.advantage": ADVANTAGES,
        "algorithm.token_mask": TOKEN_MASKS,
        "algorithm.policy_loss": POLICY_LOSSES,
        "algorithm.rollout_correction": ROLLOUT_CORRECTIONS,
    }


def spec_at(cfg: DictConfig, key: str) -> PluginSpec:
    """The plug-in configured at `key` (a bare name or {name, options}), options resolved to plain values."""
    node = OmegaConf.select(cfg, key)
    value = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    try:
        return plugin_spec(value, key)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_plugins(cfg: DictConfig) -> dict[str, Plugin]:
    """Every algorithm plug-in, built once: config key -> Plugin."""
    return {key: registry.build(spec_at(cfg, key)) for key, registry in plug_points().items()}

