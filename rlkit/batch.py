"""RolloutBatch, the one structure every stage of a step reads and extends, and PolicyOutputs, what the
policy says about a batch's tokens (docs/architecture.md)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

# What a sample is, by how it was drawn (RolloutBatch.kind); only fresh samples measure the policy on the task.
SAMPLE_KINDS = ("fresh", "branch", "refinement")


@dataclass
class RolloutBatch:
    """B sampled responses, padded on the right to T tokens.

    prompt_ids: [B] token-id lists, the context each response is trained under.
    response_ids: [B,T] long. behavior_logprobs: [B,T].
    response_mask: [B,T] float in {0,1}, the tokens the loss trains on (a method may mask tokens out of it).
    response_lengths: [B] long, the tokens each response has (what the forward reads); filled from
        `response_mask` when not given, so give it whenever the mask may have holes.
    group_ids: [B] long (samples compared against each other share an id).
    prompt_index: [B] long, which of the step's prompts each sample answers (several groups may share one).
    truncated: [B] bool, the response hit max_tokens.
    rows: [B] dataset rows ({"question", "answer", "meta"}). texts: [B] decoded responses.
    Filled by later stages: rewards/correct/scorable [B] (verifier, shaper), advantages [B,T] (estimator).
    off_context: [B] bool or None; True where the response was sampled under another context than
        `prompt_ids` (e.g. a refinement sampled after a critique but trained as an answer to the question):
        its behaviour logprobs are not the policy's logprobs in the trained context, so the trainer
        recomputes its old logprobs and leaves it out of the engine-vs-trainer logprob gap.
    estimator_inputs: extra keyword tensors for the advantage estimator, e.g. FR3E's state ids [B].
    extras: other per-sample tensors a method adds ([B] or [B,T], e.g. `is_refinement`).
    policy_version: [B] long or None, the `Learner.version` whose weights sampled each response (set by collect).
    kind: [B] what each sample is (SAMPLE_KINDS): fresh (drawn from the question alone), branch (continued
        from a prefix of another response) or refinement (written after a critique); all fresh when not given.
    notes: [B] dicts of text logged with each sample in samples.jsonl (e.g. a refinement's critique).
    """

    prompt_ids: list[list[int]]
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    behavior_logprobs: torch.Tensor
    group_ids: torch.Tensor
    prompt_index: torch.Tensor
    truncated: torch.Tensor
    rows: list[dict]
    texts: list[str]
    rewards: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    scorable: torch.Tensor | None = None
    extracted: list[str | None] | None = None
    advantages: torch.Tensor | None = None
    off_context: torch.Tensor | None = None
    estimator_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    response_lengths: torch.Tensor | None = None
    policy_version: torch.Tensor | None = None
    kind: list[str] | None = None
    notes: list[dict] | None = None

    def __post_init__(self):
        if self.response_lengths is None:
            self.response_lengths = self.response_mask.sum(-1).long()
        if self.kind is None:
            self.kind = ["fresh"] * len(self)
        if self.notes is None:
            self.notes = [{} for _ in range(len(self))]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def lengths(self) -> torch.Tensor:
        """[B] long response lengths (tokens generated, whatever the loss mask keeps)."""
        return self.response_lengths

    @staticmethod
    def placeholder(pad_id: int) -> "RolloutBatch":
        """One response of one pad token to one one-token prompt: what a rank with nothing to run forwards so
        that it still joins the collectives of ranks that have more."""
        one = torch.full((1, 1), pad_id, dtype=torch.long)
        return RolloutBatch(prompt_ids=[[pad_id]], response_ids=one, response_mask=torch.ones(1, 1),
                            behavior_logprobs=torch.zeros(1, 1), group_ids=torch.zeros(1, dtype=torch.long),
                            prompt_index=torch.zeros(1, dtype=torch.long), truncated=torch.zeros(1, dtype=torch.bool),
                            rows=[{}], texts=[""])

    def select(self, index: torch.Tensor | list[int]) -> "RolloutBatch":
        """Rows `index` (in that order) of every per-sample field."""
        index = torch.as_tensor(index, dtype=torch.long)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                picked[f.name] = {k: v[index] for k, v in value.items()}
            else:
                picked[f.name] = _take(value, index)
        return RolloutBatch(**picked)

    @staticmethod
    def concat(batches: list["RolloutBatch"], pad_id: int = 0) -> "RolloutBatch":
        """Stack batches along B, re-padding [B,T] fields to the widest T."""
        if len(batches) == 1:
            return batches[0]
        width = max(b.response_ids.shape[1] for b in batches)
        merged = {}
        for f in fields(RolloutBatch):
            values = [getattr(b, f.name) for b in batches]
            if isinstance(values[0], dict):
                merged[f.name] = {k: _cat([v[k] for v in values], width, 0) for k in values[0]}
            elif all(v is None for v in values):
                merged[f.name] = None
            elif any(v is None for v in values):
                raise ValueError(f"RolloutBatch.concat: {f.name} is set on some batches and None on others")
            elif isinstance(values[0], list):
                merged[f.name] = [item for v in values for item in v]
            else:
                merged[f.name] = _cat(values, width, pad_id if f.name == "response_ids" else 0)
        return RolloutBatch(**merged)


@dataclass
class PolicyOutputs:
    """logprobs, entropies: [b,T] (0 where the mask is 0). hidden: [b,T,d] detached final hidden states
    that predict each response token, for token masks such as CAPO (None unless asked for)."""

    logprobs: torch.Tensor
    entropies: torch.Tensor
    hidden: torch.Tensor | None = None


def _take(value, index: torch.Tensor):
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[index]
    return [value[i] for i in index.tolist()]


def _cat(values: list[torch.Tensor], width: int, pad) -> torch.Tensor:
    if values[0].dim() < 2:
        return torch.cat(values)
    padded = [torch.nn.functional.pad(v, (0, width - v.shape[1]), value=pad) for v in values]
    return torch.cat(padded)
