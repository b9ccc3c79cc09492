"""Model preparation (SmolLM2 from its packaged GGUF) and tiny random models for tests.

Imports are lazy so `python -m rlkit.models.prepare` starts fast and without runpy warnings.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "build_tiny_model": "rlkit.models.tiny",
    "default_model_dir": "rlkit.models.prepare",
    "prepare_smollm2": "rlkit.models.prepare",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlkit.models' has no attribute {name!r}")
