"""Shared-prompt forward: each distinct prompt of a micro-batch runs once, its responses on top of its keys/values.

The n responses of a group share one prompt. Instead of n padded prompt+response rows, the prompts run in one
forward (right-padded, one row per distinct prompt) that returns their per-layer keys and values; the responses
then run in a second forward whose KV cache holds, for each response, its own prompt's keys and values (an index,
not a copy of the computation). Attention is split as in Prefix Grouper (arXiv 2506.05433): the prompt attends to
itself, each response to its prompt and its own causal past. The cache tensors keep their autograd history, so the
gradient of every response flows back through the one shared prompt computation. Rows are grouped by identical
prompt ids, never by group id (FR3E branches and Critique-GRPO refinements may differ within a group).
"""
from __future__ import annotations

import torch
from transformers import DynamicCache


def prompt_groups(prompt_ids: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Distinct prompts in order of first appearance, and each row's index into them [b] (long)."""
    index: dict[tuple[int, ...], int] = {}
    group = [index.setdefault(tuple(p), len(index)) for p in prompt_ids]
    return [list(p) for p in index], torch.tensor(group, dtype=torch.long)


def row_order(prompt_ids: list[list[int]], lengths: torch.Tensor, *, by_prompt: bool) -> torch.Tensor:
    """A permutation [b] of the rows for micro-batching: by length [b] (prompt+response tokens), descending; with
    `by_prompt`, rows of one prompt stay adjacent (so they share a micro-batch), groups ordered by their longest row."""
    by_length = lengths.argsort(descending=True, stable=True)
    if not by_prompt or not len(lengths):
        return by_length
    _, group = prompt_groups(prompt_ids)
    longest = torch.zeros(int(group.max()) + 1, dtype=lengths.dtype).scatter_reduce(0, group, lengths, reduce="amax")
    return by_length[(-longest[group[by_length]]).argsort(stable=True)]  # stable: ties keep the length order


def right_padded(rows: list[torch.Tensor], pad_id: int, min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of 1-D long tensors -> ids [r,W] right-padded with pad_id, attention mask [r,W] (long);
    W = the longest row, at least min_width."""
    width = max([min_width, *(len(r) for r in rows)])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def check_cache(base_model: torch.nn.Module) -> None:
    """RuntimeError under gradient checkpointing in training, which drops the KV cache the second forward reads."""
    if getattr(base_model, "gradient_checkpointing", False) and base_model.training:
        raise RuntimeError("trainer.shared_prompt_forward needs the KV cache, which gradient checkpointing drops. "
                           "Fix: trainer.shared_prompt_forward=false or model.gradient_checkpointing=false")


def shared_prompt_hidden(base_model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: torch.Tensor,
                         lengths: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Final hidden states [N,d] predicting response token steps[k] of row rows[k] (both [N] long).

    response_ids [b,T]; lengths [b]: tokens of each response the forward reads. Needs a causal LM whose
    `base_model` takes `past_key_values` (every HF decoder); refused under gradient checkpointing, which drops
    the cache in training.
    """
    check_cache(base_model)
    device = next(base_model.parameters()).device
    prompts, group = prompt_groups(prompt_ids)
    prompt_len = torch.tensor([len(p) for p in prompts])
    ids, mask = right_padded([torch.tensor(p, dtype=torch.long) for p in prompts], pad_id)
    out = base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
    # token 0 of a response is predicted by its prompt's last position, token t > 0 by response position t - 1
    first = out.last_hidden_state[group.to(device), (prompt_len - 1)[group].to(device)]  # [b,d]
    lengths = torch.as_tensor(lengths).long().cpu()
    body = [response_ids[i, : max(int(n) - 1, 0)].long().cpu() for i, n in enumerate(lengths)]
    # The second forward runs even when no response has a second token (one masked pad column, never read):
    # sharded ranks must pair up every parameter gather, whatever their responses' lengths.
    body_ids, body_mask = right_padded(body, pad_id, min_width=1)
    width = body_ids.shape[1]
    on_device = group.to(device)
    cache = DynamicCache(ddp_cache_data=[(layer.keys[on_device], layer.values[on_device])
                                         for layer in out.past_key_values.layers], config=base_model.config)
    positions = prompt_len[group][:, None] + torch.arange(width)[None, :]
    attention = torch.cat([mask[group], body_mask], dim=1)  # [b, P_max + width]: own prompt, then own tokens
    hidden = base_model(input_ids=body_ids.to(device), attention_mask=attention.to(device),
                        position_ids=positions.to(device), past_key_values=cache, use_cache=True).last_hidden_state
    later = hidden[rows.to(device), (steps - 1).clamp(min=0).to(device)]  # [N,d]
    return torch.where((steps == 0).to(device)[:, None], first[rows.to(device)], later)
