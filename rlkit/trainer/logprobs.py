"""Per-token logprobs and entropies of sampled responses under the policy.

Never materialises [B,T,V] logits: the LM head runs only on the hidden states that
predict response tokens, in chunks; where a forward has more than one chunk, each chunk is
recomputed in backward instead of keeping its [chunk, V] activations (`head_recompute`).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from rlkit.batch import PolicyOutputs
from rlkit.trainer.packing import packed_hidden, packed_shared_prompt_hidden, packs
from rlkit.trainer.shared_prompt import shared_prompt_hidden


def pack_inputs(prompt_ids: list[list[int]], response_ids: torch.Tensor, lengths: torch.Tensor, pad_id: int):
    """Right-padded prompt+response rows trimmed to this micro-batch's longest.

    lengths: [b] tokens of each response (`response_ids[i, :lengths[i]]` is laid out after prompt i).
    Returns input_ids [b,L], attention_mask [b,L], and the position of the hidden state
    that predicts response token t of row i: positions [b,T] (= len(prompt_i) - 1 + t).
    """
    lengths = torch.as_tensor(lengths).long().tolist()
    totals = [len(p) + n for p, n in zip(prompt_ids, lengths)]
    width = max(totals)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, (prompt, n) in enumerate(zip(prompt_ids, lengths)):
        input_ids[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, len(prompt) : len(prompt) + n] = response_ids[row, :n]
        attention[row, : len(prompt) + n] = 1
    steps = torch.arange(response_ids.shape[1])
    positions = torch.tensor([len(p) - 1 for p in prompt_ids])[:, None] + steps[None, :]
    positions = positions.clamp(max=width - 1)
    return input_ids, attention, positions


def _head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    """hidden [N,d], weight [V,d], targets [N] -> (logprob [N], entropy [N])."""
    logits = (hidden @ weight.T).float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets[:, None])[:, 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def trunk(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder trunk of a causal LM (its forward returns `last_hidden_state`): `model.base_model`. Under a
    peft wrapper `base_model` is the LoRA tuner around the whole causal LM (whose forward computes full logits),
    so the wrapper is unwrapped first; the adapter's layers sit inside the trunk and act in its forward."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def policy_logprobs(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    pad_id: int,
    lengths: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    return_hidden: bool = False,
    shared_prompt: bool = False,
    padding_free: bool = False,
    head_recompute: str = "auto",
) -> PolicyOutputs:
    """Logprobs [b,T] of `response_ids` given `prompt_ids` under `model`, at the sampling temperature.

    The forward reads each response's first `lengths[i]` tokens ([b] long; default: `response_mask`'s row
    sums); logprobs and entropies are computed where `response_mask` [b,T] is 1, 0 elsewhere.

    Works for any HF causal LM whose `base_model` returns `last_hidden_state` and whose
    output embedding is a bias-free linear head (Llama, Qwen2/3, Mistral, SmolLM, ...), and for such a model
    wrapped by peft (LoRA: `trunk`).
    shared_prompt: run each distinct prompt once (`rlkit.trainer.shared_prompt`) instead of once per row.
    padding_free: pack the sequences into rows as wide as the longest, short ones sharing a row, where that
    saves a row (`rlkit.trainer.packing`); with shared_prompt, the response bodies on the distinct prompts.
    head_recompute: when backward recomputes each chunk's [chunk,V] logits instead of keeping them from the
    forward: "always", "never", or "auto" (only when there is more than one chunk; one chunk's logits are
    resident when backward starts either way, so recomputing a lone chunk costs time and saves no memory).
    """
    device = next(model.parameters()).device
    body = trunk(model)
    lengths = response_mask.sum(-1).long() if lengths is None else lengths
    rows, steps = response_mask.nonzero(as_tuple=True)
    lengths_list = torch.as_tensor(lengths).long().tolist()
    if shared_prompt:
        packed = padding_free and packs([max(n - 1, 0) for n in lengths_list])  # the bodies after the shared prompts
        forward = packed_shared_prompt_hidden if packed else shared_prompt_hidden
        picked = forward(body, prompt_ids, response_ids, lengths, rows, steps, pad_id)
    elif padding_free and packs([len(p) + n for p, n in zip(prompt_ids, lengths_list)]):
        picked = packed_hidden(body, prompt_ids, response_ids, lengths, rows, steps)
    else:
        input_ids, attention, positions = pack_inputs(prompt_ids, response_ids, lengths, pad_id)
        hidden = body(input_ids=input_ids.to(device), attention_mask=attention.to(device)).last_hidden_state
        picked = hidden[rows.to(device), positions[rows, steps].to(device)]  # [N,d]
    targets = response_ids[rows, steps].to(device)
    weight = model.get_output_embeddings().weight
    recompute = torch.is_grad_enabled() and (
        head_recompute == "always" or (head_recompute == "auto" and picked.shape[0] > chunk_tokens))
    logps, ents = [], []
    for start in range(0, picked.shape[0], chunk_tokens):
        h, t = picked[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if recompute:
            lp, ent = checkpoint(_head_logprobs, h, weight, t, temperature, use_reentrant=False)
        else:
            lp, ent = _head_logprobs(h, weight, t, temperature)
        logps.append(lp)
        ents.append(ent)
    shape = response_ids.shape
    logprobs = torch.zeros(shape, device=device, dtype=torch.float32)
    entropies = torch.zeros(shape, device=device, dtype=torch.float32)
    index = (rows.to(device), steps.to(device))
    if picked.shape[0]:
        logprobs = logprobs.index_put(index, torch.cat(logps))
        entropies = entropies.index_put(index, torch.cat(ents))
    hidden_out = None
    if return_hidden:
        hidden_out = torch.zeros(*shape, picked.shape[-1], device=device, dtype=picked.dtype)
        hidden_out[index] = picked.detach()
    return PolicyOutputs(logprobs, entropies, hidden_out)
