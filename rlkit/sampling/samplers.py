"""Samplers: turn a batch of prompt rows into a RolloutBatch through a RolloutEngine (docs/architecture.md).

A sampler is ``fn(rows, ctx, *, first_group_id, **options) -> RolloutBatch``; it fills ``prompt_index``
(which of `rows` each sample answers) and numbers its groups from ``first_group_id`` upwards. It may
make any number of groups per prompt, and may score mid-sampling through ``ctx.score``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlkit.batch import PolicyOutputs, RolloutBatch
from rlkit.registry import Registry
from rlkit.rollout.base import Completion, RolloutEngine, SamplingConfig

SAMPLERS: Registry = Registry("sampler", inputs=("rows", "ctx", "first_group_id"))


@dataclass
class SamplerContext:
    """What a sampler may use.

    score(batch): fills rewards/correct/scorable/extracted of a batch in place, for samplers that must
        see rewards while sampling (e.g. critique-guided refinement).
    token_stats(batch): the current policy's logprobs and full-distribution entropies [B,T] of the batch's
        responses (no grad, micro-batched, never [B,T,V]), e.g. to pick branch points by entropy.
    """

    engine: RolloutEngine
    tokenizer: object
    sampling: SamplingConfig
    build_prompt: Callable[[dict], list[int]]
    score: Callable[[RolloutBatch], None]
    pad_id: int
    token_stats: Callable[[RolloutBatch], PolicyOutputs] | None = None


def batch_from_completions(
    prompt_ids: list[list[int]],
    rows: list[dict],
    completions: list[Completion],
    group_ids: list[int],
    ctx: SamplerContext,
    kind: str = "fresh",
) -> RolloutBatch:
    """Pad completions into a RolloutBatch; completion k answers prompt `completions[k].prompt_index`
    and belongs to group `group_ids[k]`; every sample is of `kind` (rlkit.batch.SAMPLE_KINDS)."""
    width = max(1, max(len(c.token_ids) for c in completions))
    size = len(completions)
    response_ids = torch.full((size, width), ctx.pad_id, dtype=torch.long)
    mask = torch.zeros(size, width)
    logprobs = torch.zeros(size, width)
    for row, c in enumerate(completions):
        n = len(c.token_ids)
        response_ids[row, :n] = torch.tensor(c.token_ids, dtype=torch.long)
        mask[row, :n] = 1.0
        logprobs[row, :n] = torch.tensor(c.logprobs)
    return RolloutBatch(
        prompt_ids=[prompt_ids[c.prompt_index] for c in completions],
        response_ids=response_ids,
        response_mask=mask,
        behavior_logprobs=logprobs,
        group_ids=torch.tensor(group_ids, dtype=torch.long),
        prompt_index=torch.tensor([c.prompt_index for c in completions], dtype=torch.long),
        truncated=torch.tensor([c.finish_reason == "length" for c in completions]),
        rows=[rows[c.prompt_index] for c in completions],
        texts=ctx.tokenizer.batch_decode([c.token_ids for c in completions], skip_special_tokens=True),
        kind=[kind] * size,
    )


@SAMPLERS.register("group")
def sample_groups(rows: list[dict], ctx: SamplerContext, *, first_group_id: int) -> RolloutBatch:
    """`sampling.n` responses per prompt; each prompt's responses form one group."""
    prompt_ids = [ctx.build_prompt(row) for row in rows]
    completions = ctx.engine.generate(prompt_ids, ctx.sampling)
    group_ids = [first_group_id + c.prompt_index for c in completions]
    return batch_from_completions(prompt_ids, rows, completions, group_ids, ctx)
