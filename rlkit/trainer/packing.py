"""Padding-free forward: a micro-batch's sequences packed into rows, attention kept within each sequence.

The padded forward gives every sequence a row as wide as the micro-batch's longest and computes the padding.
Here the sequences are placed in rows of that same width, longest first, each into the first row with room
(first-fit decreasing), so short sequences share a row; position ids restart at each sequence, and a block-diagonal
causal mask lets a token attend to the earlier tokens of its own sequence only. A row's leftover slots form one
padding sequence of their own (attending to themselves, never read). Attention costs rows x width^2, as padded:
no row is wider than the padded forward's, so packing never makes attention quadratic in the micro-batch.
When no row holds two sequences the layout is the padded one and `packs` says so: the caller runs the padded
forward (transformers' own masks, exactly the same numbers).

The 4D mask is built explicitly, in the convention of the model's attention implementation (SDPA: boolean,
True = attend; eager: additive, 0 or the dtype's minimum); transformers (5.x `masking_utils`) passes a 4D mask
through as is. transformers' own padding-free path (position ids without a mask) needs flash-attention.

With the shared prompt (`rlkit.trainer.shared_prompt`) the distinct prompts run once, right-padded, and the
response bodies are packed into rows whose cache holds every distinct prompt's keys and values: each response
token attends to its own prompt's positions and its own causal past.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from rlkit.trainer.shared_prompt import right_padded, check_cache, prompt_groups

ATTENTION = ("sdpa", "eager")  # implementations that take a custom 4D mask


def first_fit(sizes: list[int], width: int) -> tuple[list[int], list[int]]:
    """Sequences of `sizes` tokens (each <= width) placed in rows of `width` slots, longest first, each into the
    first row with room -> (row, first slot) of each sequence, in the order of `sizes`."""
    free: list[int] = []
    row, col = [0] * len(sizes), [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        r = next((r for r, room in enumerate(free) if room >= sizes[i]), len(free))
        if r == len(free):
            free.append(width)
        row[i], col[i] = r, width - free[r]
        free[r] -= sizes[i]
    return row, col


def packs(sizes: list[int]) -> bool:
    """Whether packing sequences of `sizes` tokens into rows as wide as the longest puts two in one row."""
    row, _ = first_fit(sizes, max(sizes, default=0))
    return len(set(r for r, n in zip(row, sizes) if n)) < sum(1 for n in sizes if n)


@dataclass
class Rows:
    """Sequences laid out in rows [R,W]: token ids, the sequence each slot holds (a row's padding: a sequence of its
    own, numbered n + row) and its position id; each sequence's row and first slot [n]. All long."""

    ids: torch.Tensor
    seq: torch.Tensor
    pos: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor

    def allowed(self) -> torch.Tensor:
        """Boolean [R,W,W]: slot i may attend slot j of its row (same sequence, not later)."""
        return (self.seq[:, :, None] == self.seq[:, None, :]) & (self.pos[:, None, :] <= self.pos[:, :, None])


def lay_out(sequences: list[torch.Tensor], first_pos: torch.Tensor | None = None) -> Rows:
    """1-D long token tensors -> `Rows` as wide as the longest (first-fit decreasing). first_pos [n]: the position
    id of each sequence's first token (default 0); padding slots take their slot index."""
    sizes = [len(s) for s in sequences]
    width = max(sizes, default=0) or 1
    row, col = first_fit(sizes, width)
    count = max(row, default=0) + 1
    slots = torch.arange(width)
    ids = torch.zeros((count, width), dtype=torch.long)
    seq = (len(sizes) + torch.arange(count))[:, None].repeat(1, width)
    pos = slots[None, :].repeat(count, 1)
    start = torch.zeros(len(sizes), dtype=torch.long) if first_pos is None else first_pos.long()
    for i, (tokens, r, c) in enumerate(zip(sequences, row, col)):
        ids[r, c : c + len(tokens)] = tokens
        seq[r, c : c + len(tokens)] = i
        pos[r, c : c + len(tokens)] = start[i] + torch.arange(len(tokens))
    return Rows(ids, seq, pos, torch.tensor(row, dtype=torch.long), torch.tensor(col, dtype=torch.long))


def attention_mask(allowed: torch.Tensor, config, dtype: torch.dtype) -> torch.Tensor:
    """Boolean allowed [R,Nq,Nk] -> the 4D mask [R,1,Nq,Nk] the model's attention implementation reads."""
    impl = getattr(config, "_attn_implementation", None)
    if impl == "sdpa":
        return allowed[:, None]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
    raise RuntimeError(f"trainer.padding_free builds a 4D attention mask, which attn_implementation={impl!r} does not "
                       f"take. Fix: load the model with attn_implementation in {ATTENTION}, or trainer.padding_free=false")


def _run(base_model: torch.nn.Module, rows: Rows, allowed: torch.Tensor, **kw):
    """`rows` through `base_model` under `allowed` [R,W,K] (K: cached keys + W) -> the model output."""
    device, dtype = next(base_model.parameters()).device, next(base_model.parameters()).dtype
    mask = attention_mask(allowed, base_model.config, dtype).to(device)
    return base_model(input_ids=rows.ids.to(device), position_ids=rows.pos.to(device), attention_mask=mask, **kw)


def packed_hidden(base_model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: torch.Tensor,
                  lengths: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Final hidden states [N,d] predicting response token steps[k] of row rows[k] (both [N] long), every
    prompt+response sequence packed into rows. response_ids [b,T]; lengths [b]: tokens of each response read."""
    lengths, rows, steps = torch.as_tensor(lengths).long().cpu(), rows.cpu(), steps.cpu()
    prompt_len = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    layout = lay_out([torch.cat([torch.tensor(p, dtype=torch.long), response_ids[i, : int(n)].long().cpu()])
                      for i, (p, n) in enumerate(zip(prompt_ids, lengths))])
    hidden = _run(base_model, layout, layout.allowed()).last_hidden_state  # [R,W,d]
    # response token t of row i is predicted by position len(prompt_i) - 1 + t of its sequence
    at = (layout.row[rows].to(hidden.device), (layout.col[rows] + prompt_len[rows] - 1 + steps).to(hidden.device))
    return hidden[at]


def packed_shared_prompt_hidden(base_model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: torch.Tensor,
                                lengths: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor,
                                pad_id: int) -> torch.Tensor:
    """`packed_hidden` with each distinct prompt run once (right-padded), then every response's body (its tokens
    but the last) packed into rows whose cache holds the distinct prompts' keys and values, laid end to end.
    Same shapes as `packed_hidden`; refused under gradient checkpointing, which drops the cache."""
    check_cache(base_model)
    device = next(base_model.parameters()).device
    rows, steps = rows.cpu(), steps.cpu()
    prompts, group = prompt_groups(prompt_ids)
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    ids, mask = right_padded([torch.tensor(p, dtype=torch.long) for p in prompts], pad_id)  # [P,Wp]
    out = base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
    # token 0 of a response is predicted by its prompt's last position, token t > 0 by body position t - 1
    first = out.last_hidden_state[group[rows].to(device), (prompt_len - 1)[group[rows]].to(device)]
    body_len = (torch.as_tensor(lengths).long().cpu() - 1).clamp(min=0)
    if not body_len.sum():  # no second token anywhere: the first row's first token, computed and never read, so the
        body_len[0] = 1     # second forward still runs (sharded ranks must pair up every parameter gather)
    bodies = lay_out([response_ids[i, : int(n)].long().cpu() for i, n in enumerate(body_len)],
                     first_pos=prompt_len[group])  # a body continues its prompt's positions
    owner = torch.cat([group, torch.full((bodies.ids.shape[0],), -1)])[bodies.seq]  # [R,W]: a slot's prompt; pad -1
    key_prompt = torch.arange(len(prompts)).repeat_interleave(ids.shape[1])  # [P*Wp]: the prompt of a cached key
    own_prompt = (owner[:, :, None] == key_prompt) & mask.reshape(-1).bool()  # [R,W,P*Wp]
    count = bodies.ids.shape[0]
    cache = DynamicCache(ddp_cache_data=[(_end_to_end(layer.keys, count), _end_to_end(layer.values, count))
                                         for layer in out.past_key_values.layers], config=base_model.config)
    hidden = _run(base_model, bodies, torch.cat([own_prompt, bodies.allowed()], dim=2), past_key_values=cache,
                  use_cache=True).last_hidden_state  # [R,W,d]
    col = (bodies.col[rows] + (steps - 1).clamp(min=0)).clamp(max=hidden.shape[1] - 1)
    later = hidden[bodies.row[rows].to(device), col.to(device)]
    return torch.where((steps == 0).to(device)[:, None], first, later)


def _end_to_end(cached: torch.Tensor, rows: int) -> torch.Tensor:
    """One layer's cached keys or values [P,h,Wp,d], the P prompts' positions laid end to end -> [rows,h,P*Wp,d]."""
    p, h, w, d = cached.shape
    return cached.transpose(0, 1).reshape(h, p * w, d)[None].expand(rows, h, p * w, d)
