"""Padding-free forward: a micro-batch's sequences back to back in one row, attention kept within each sequence.

Instead of b right-padded rows [b, max L], the prompt+response tokens of every row run as one row [1, sum L_i] whose
position ids restart at 0 at each sequence, under a block-diagonal causal mask: a token attends to the earlier
tokens of its own sequence only. No pad token is computed. transformers' padding-free path (position ids without
a mask) is built for flash-attention (its SDPA/eager detection of packed position ids varies by version); here the
4D mask is built explicitly, in the convention of the model's attention implementation (SDPA: boolean, True =
attend; eager: additive, 0 or the dtype's minimum), and transformers (5.x `masking_utils`) passes a 4D mask through
as is. The mask holds (sum L)^2 booleans: trainer.micro_batch_tokens bounds it.

With the shared prompt (`rlkit.trainer.shared_prompt`) the distinct prompts are packed into one row, and the
response bodies into a second row on top of the packed prompts' keys and values: each response token attends to
its own prompt's block and its own causal past.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from rlkit.trainer.shared_prompt import check_cache, prompt_groups

ATTENTION = ("sdpa", "eager")  # implementations that take a custom 4D mask


def segments(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences of `sizes` tokens laid out back to back -> (sequence index [N], position in it [N], start [n]),
    N = sum(sizes), all long."""
    sizes_t = torch.tensor(sizes, dtype=torch.long)
    starts = torch.cumsum(sizes_t, 0) - sizes_t
    seq = torch.repeat_interleave(torch.arange(len(sizes)), sizes_t)
    return seq, torch.arange(int(sizes_t.sum())) - starts[seq], starts


def attend(q_seq: torch.Tensor, q_pos: torch.Tensor, k_seq: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean [Nq,Nk]: query i may attend key j (same sequence, not later). All inputs 1-D long."""
    return (q_seq[:, None] == k_seq[None, :]) & (k_pos[None, :] <= q_pos[:, None])


def attention_mask(allowed: torch.Tensor, config, dtype: torch.dtype) -> torch.Tensor:
    """Boolean allowed [Nq,Nk] -> the 4D mask [1,1,Nq,Nk] the model's attention implementation reads."""
    impl = getattr(config, "_attn_implementation", None)
    if impl == "sdpa":
        return allowed[None, None]
    if impl == "eager":
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]
    raise RuntimeError(f"trainer.padding_free builds a 4D attention mask, which attn_implementation={impl!r} does not "
                       f"take. Fix: load the model with attn_implementation in {ATTENTION}, or trainer.padding_free=false")


def _run(base_model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor, **kw):
    """One packed row through `base_model`: ids, positions [N] long, allowed [N, K] bool -> the model output."""
    device, dtype = next(base_model.parameters()).device, next(base_model.parameters()).dtype
    mask = attention_mask(allowed, base_model.config, dtype).to(device)
    return base_model(input_ids=ids[None].to(device), position_ids=positions[None].to(device), attention_mask=mask, **kw)


def packed_hidden(base_model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: torch.Tensor,
                  lengths: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Final hidden states [N,d] predicting response token steps[k] of row rows[k] (both [N] long), every
    prompt+response sequence in one packed row. response_ids [b,T]; lengths [b]: tokens of each response read."""
    lengths, rows, steps = torch.as_tensor(lengths).long().cpu(), rows.cpu(), steps.cpu()
    prompt_len = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    seq, pos, starts = segments((prompt_len + lengths).tolist())
    ids = torch.cat([torch.cat([torch.tensor(p, dtype=torch.long), response_ids[i, : int(n)].long().cpu()])
                     for i, (p, n) in enumerate(zip(prompt_ids, lengths))])
    hidden = _run(base_model, ids, pos, attend(seq, pos, seq, pos)).last_hidden_state[0]  # [sum L, d]
    # response token t of row i is predicted by position len(prompt_i) - 1 + t of its sequence
    return hidden[(starts[rows] + prompt_len[rows] - 1 + steps).to(hidden.device)]


def packed_shared_prompt_hidden(base_model: torch.nn.Module, prompt_ids: list[list[int]], response_ids: torch.Tensor,
                                lengths: torch.Tensor, rows: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """`packed_hidden` with each distinct prompt run once: the distinct prompts packed in one row, then every
    response's body (its tokens but the last) packed in a second row whose cache holds the packed prompts'
    keys and values. Same shapes as `packed_hidden`; refused under gradient checkpointing, which drops the cache."""
    check_cache(base_model)
    rows, steps = rows.cpu(), steps.cpu()
    prompts, group = prompt_groups(prompt_ids)
    prompt_len = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    p_seq, p_pos, p_starts = segments(prompt_len.tolist())
    ids = torch.cat([torch.tensor(p, dtype=torch.long) for p in prompts])
    out = _run(base_model, ids, p_pos, attend(p_seq, p_pos, p_seq, p_pos), use_cache=True)
    # token 0 of a response is predicted by its prompt's last position, token t > 0 by body position t - 1
    first = out.last_hidden_state[0][(p_starts + prompt_len - 1)[group][rows].to(out.last_hidden_state.device)]
    body_len = (torch.as_tensor(lengths).long().cpu() - 1).clamp(min=0)
    if not body_len.sum():  # no second token anywhere: the first row's first token, computed and never read, so the
        body_len[0] = 1     # second forward still runs (sharded ranks must pair up every parameter gather)
    b_seq, b_pos, b_starts = segments(body_len.tolist())
    b_pos = b_pos + prompt_len[group][b_seq]  # a body continues its prompt's positions
    body = torch.cat([response_ids[i, : int(n)].long().cpu() for i, n in enumerate(body_len)])
    allowed = torch.cat([attend(group[b_seq], b_pos, p_seq, p_pos), attend(b_seq, b_pos, b_seq, b_pos)], dim=1)
    cache = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in out.past_key_values.layers],
                         config=base_model.config)
    hidden = _run(base_model, body, b_pos, allowed, past_key_values=cache, use_cache=True).last_hidden_state[0]
    later = hidden[(b_starts[rows] + (steps - 1).clamp(min=0)).clamp(max=hidden.shape[0] - 1).to(hidden.device)]
    return torch.where((steps == 0).to(first.device)[:, None], first, later)
