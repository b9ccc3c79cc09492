"""The rollout-engine protocol: prompts in, sampled tokens with their logprobs out."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from rlkit.registry import Registry


@dataclass(frozen=True)
class SamplingConfig:
    """What to sample; the engine-independent subset of vLLM's SamplingParams."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Completion:
    """One sampled response to one prompt.

    token_ids: [L] sampled tokens (EOS included when the model stopped).
    logprobs: [L] behaviour logprob of each sampled token under the sampling distribution
        (after temperature), as the trainer recomputes it.
    finish_reason: "stop" (EOS/stop token) or "length" (hit max_tokens).
    """

    prompt_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


class RolloutEngine(Protocol):
    """Generates completions and receives the trainer's weights every step."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """Return `sampling.n` completions per prompt, grouped by prompt in prompt order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (the trainer's state) into the engine's model."""
        ...

    def sleep(self) -> None: ...

    def wake(self) -> None: ...

    def close(self) -> None: ...


ENGINES: Registry = Registry("rollout engine", inputs=("model_path", "dtype"))
