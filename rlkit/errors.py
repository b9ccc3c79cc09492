"""Errors every layer may raise: a leaf module, so raising one never imports the layer that defines the checks."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def require(ok: bool, key: str, problem: str, fix: str) -> None:
    """Raise `ConfigError("<key>: <problem>. Fix: <fix>")` unless `ok`: the one form of every config refusal."""
    if not ok:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}")
