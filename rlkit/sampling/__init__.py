"""Rollout production: samplers, group filters and the per-step collect loop (docs/architecture.md)."""
from rlkit.sampling.collect import Collected, collect
from rlkit.sampling import critique as _critique  # noqa: F401  registers SAMPLERS["critique"]
from rlkit.sampling.filters import GROUP_FILTERS
from rlkit.sampling import fr3e as _fr3e  # noqa: F401  registers SAMPLERS["fr3e"]
from rlkit.sampling.samplers import SAMPLERS, SamplerContext, batch_from_completions

__all__ = ["GROUP_FILTERS", "SAMPLERS", "Collected", "SamplerContext", "batch_from_completions", "collect"]
