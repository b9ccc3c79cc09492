"""Errors every layer may raise: a leaf module, so raising one never imports the layer that defines the checks."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""
