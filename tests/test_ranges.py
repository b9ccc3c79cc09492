"""Every numeric key of the default config and of every recipe has an allowed range (rlkit/ranges.py), and a
value outside it is refused at validation in one line that names the key."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlkit.config import CONFIG_DIR, ConfigError, compose
from rlkit.validation import validate
from rlkit.ranges import RANGES, Range, range_of

RECIPES = sorted(p.stem for p in Path(CONFIG_DIR, "..", "recipes").glob("*.yaml"))


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _numeric(value) -> bool:
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items)


@pytest.fixture(scope="module")
def configs(tiny_model_dir):
    """(name, composed config) of the default, the server engine's rollout and every recipe, values resolved."""
    return [(name, compose([f"model.path={tiny_model_dir}", *extra]))
            for name, extra in [("default", []), ("vllm_server", ["rollout=vllm_server"]),
                                *((r, [f"+recipe={r}"]) for r in RECIPES)]]


def _bad_value(allowed: Range):
    if allowed.low is not None:
        bad = allowed.low if allowed.low_open else allowed.low - (1 if allowed.integer else 0.5)
    elif allowed.high is not None:
        bad = allowed.high if allowed.high_open else allowed.high + 1
    else:
        bad = 0.5 if allowed.integer else "abc"
    return [bad] if allowed.items else bad


def test_every_numeric_key_has_a_range_and_every_range_a_key(configs):
    paths = {name: dict(_leaves(OmegaConf.to_container(cfg, resolve=True))) for name, cfg in configs}
    missing = sorted({f"{path} ({name})" for name, leaves in paths.items() for path, value in leaves.items()
                      if _numeric(value) and range_of(path) is None})
    assert not missing, f"numeric keys without an entry in rlkit.ranges.RANGES: {missing}"
    every = {path for leaves in paths.values() for path in leaves}
    unused = [pattern for pattern in RANGES if not any(range_of(path) is RANGES[pattern] and _matches(pattern, path)
                                                       for path in every)]
    assert not unused, f"RANGES entries no config of the default or a recipe has: {unused}"


def _matches(pattern: str, path: str) -> bool:
    segments, parts = pattern.split("."), path.split(".")
    return len(segments) == len(parts) and all(s in ("*", p) for s, p in zip(segments, parts))


def test_a_value_outside_its_range_is_refused_naming_the_key(configs):
    tried = set()
    for name, cfg in configs:
        validate(cfg)
        for path, _ in _leaves(OmegaConf.to_container(cfg, resolve=False)):
            allowed = range_of(path)
            if allowed is None or path in tried:
                continue
            tried.add(path)
            for bad in (_bad_value(allowed), "abc"):
                broken = cfg.copy()
                OmegaConf.update(broken, path, bad, merge=False)
                with pytest.raises(ConfigError) as err:
                    validate(broken)
                message = str(err.value)
                assert message.startswith(f"{path}: ") and "Fix: " in message and "\n" not in message, (name, message)
    assert {"trainer.total_steps", "rollout.top_p", "reward.timeout_s", "eval.suite.arithmetic.limit"} <= tried


def test_range_messages():
    assert str(RANGES["rollout.top_k"]) == "an integer >= 1 or -1 (off)"
    assert str(RANGES["trainer.max_grad_norm"]) == "a number > 0 or null"
    assert str(RANGES["rollout.top_p"]) == "a number in (0, 1]"
    assert RANGES["trainer.betas"].allows([0.9, 0.999]) and not RANGES["trainer.betas"].allows([0.9, 1.0])
    assert not RANGES["trainer.total_steps"].allows(True) and not RANGES["trainer.total_steps"].allows(2.0)
    assert RANGES["trainer.lr"].allows(1) and not RANGES["trainer.lr"].allows(float("nan"))
    with pytest.raises(ConfigError, match=r"^trainer.total_steps: must be an integer >= 1, got -1. Fix: set "
                                          r"trainer.total_steps to an integer >= 1 \(default: 40\)$"):
        validate(compose(["trainer.total_steps=-1"]))
