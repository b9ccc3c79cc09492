"""Rollout engines (`vllm`, `vllm_server`, `hf`) behind one protocol; see `rlkit.rollout.base`."""
import difflib
import logging

from rlkit.registry import PluginSpec
from rlkit.rollout.base import ENGINES, Completion, RolloutEngine, SamplingConfig
from rlkit.rollout.kv_cache import GenerationShape, auto_kv_cache_gib
from rlkit.rollout.vllm_engine import MAX_MODEL_LEN  # vllm itself is imported only when an engine starts

# Built-ins by import path, so the heavy `vllm` import happens only when it is used.
_BUILTIN = {"vllm": "rlkit.rollout.vllm_engine:VLLMEngine", "hf": "rlkit.rollout.hf_engine:HFEngine",
            "vllm_server": "rlkit.rollout.server_engine:VLLMServerEngine"}


def engine_target(name: str) -> str:
    """The registry key of engine `name`: a built-in's import path, else `name` itself (a registered name or an
    import path). KeyError listing every engine name for anything else."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    if ":" in name or name in ENGINES:
        return name
    close = difflib.get_close_matches(name, engine_names(), n=1, cutoff=0.6)
    raise KeyError(f"unknown rollout engine {name!r}{f'; did you mean {close[0]!r}?' if close else ''} "
                   f"known: {', '.join(engine_names())} (or give an import path 'package.module:Class')")


def create_engine(name: str, model_path: str, **options) -> RolloutEngine:
    """Build the engine called `name` (a built-in, a registered name or 'pkg.mod:Class')."""
    return ENGINES.get(engine_target(name))(model_path, **options)


def make_engine(spec: PluginSpec, model_path: str, dtype: str, shape: GenerationShape | None = None) -> RolloutEngine:
    """The engine a config names (`rollout.engine`), for the model at `model_path` in precision `dtype`.
    `shape`: the calls it will serve, which size its KV cache where the options say `kv_cache_gib: auto`."""
    options = dict(spec.options)
    if options.get("kv_cache_gib") == "auto":
        if shape is None:
            raise ValueError("rollout.engine.options.kv_cache_gib=auto sizes the cache to the batch: pass the "
                             "engine's GenerationShape, or set a size in GiB")
        options["kv_cache_gib"] = auto_kv_cache_gib(model_path, dtype, shape, max_num_seqs=options.get("max_num_seqs"),
                                                    max_model_len=options.get("max_model_len", MAX_MODEL_LEN))
        logging.getLogger("rlkit").info("KV cache sized to the batch (kv_cache_gib=auto): %.3f GiB",
                                        options["kv_cache_gib"])
    return create_engine(spec.name, model_path, dtype=dtype, **options)


def engine_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(ENGINES.names()))


__all__ = ["ENGINES", "Completion", "GenerationShape", "RolloutEngine", "SamplingConfig", "create_engine", "engine_names",
           "engine_target", "make_engine"]
