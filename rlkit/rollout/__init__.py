"""Rollout engines (`vllm`, `hf`) behind one protocol; see `rlkit.rollout.base`."""
from rlkit.rollout.base import ENGINES, Completion, RolloutEngine, SamplingConfig

# Built-ins by import path, so the heavy `vllm` import happens only when it is used.
_BUILTIN = {"vllm": "rlkit.rollout.vllm_engine:VLLMEngine", "hf": "rlkit.rollout.hf_engine:HFEngine"}


def create_engine(name: str, model_path: str, **options) -> RolloutEngine:
    """Build the engine called `name` (a built-in, a registered name or 'pkg.mod:Class')."""
    return ENGINES.get(_BUILTIN.get(name, name))(model_path, **options)


def engine_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(ENGINES.names()))


__all__ = ["ENGINES", "Completion", "RolloutEngine", "SamplingConfig", "create_engine", "engine_names"]
