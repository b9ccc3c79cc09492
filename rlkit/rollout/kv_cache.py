"""The colocated vLLM engine's CPU KV cache sized to the batches it generates (`kv_cache_gib: auto`).

vLLM on CPU allocates and zeroes its whole KV cache at start, so it is resident all run. A fixed size is too much
for a small batch and too little for a long one, and too little costs speed without a word: vLLM then decodes
fewer sequences at once. `auto` sizes the cache to the largest batch the prompts can make: the `prompts` longest
prompts, n samples each, every sample at max_tokens (capped by max_model_len), in whole KV blocks, at most
max_num_seqs sequences at once, and never less than one max_model_len sequence (vLLM refuses less), plus the
block vLLM holds back (its null block).
A prompt's blocks shared between its n samples by prefix caching are not subtracted (the bound stays safe).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CPU_BLOCK_TOKENS = 128  # vLLM 0.32's KV block on CPU for attention models (tests compare the engine's)
NULL_BLOCKS = 1  # the block vLLM's block pool keeps back (v1 BlockPool.null_block)
CPU_MAX_NUM_SEQS = 256  # vLLM 0.32's sequences at once on CPU when max_num_seqs is unset


@dataclass(frozen=True)
class GenerationShape:
    """What one engine call may hold: `prompts` of the prompts whose token counts are `prompt_lengths` (every
    prompt the engine may be given), n samples each, up to max_tokens new tokens each."""

    prompt_lengths: tuple[int, ...]
    prompts: int
    n: int
    max_tokens: int


def kv_bytes_per_token(model_path: str, dtype: str) -> int:
    """Bytes one token's keys and values take over every layer of the model at `model_path`, held in `dtype`
    ("float32", "bfloat16", ...; "auto": the checkpoint's own)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    if dtype == "auto":
        dtype = str(getattr(config, "torch_dtype", None) or "float32").removeprefix("torch.")
    return 2 * text.num_hidden_layers * kv_heads * head_dim * getattr(torch, dtype).itemsize


def cache_blocks(shape: GenerationShape, *, max_model_len: int, max_num_seqs: int) -> int:
    """KV blocks (CPU_BLOCK_TOKENS tokens each) that hold the largest call `shape` allows, all its sequences
    at full length: the `prompts` longest prompts x n samples, at most `max_num_seqs` sequences, at least one
    `max_model_len` sequence; plus vLLM's null block, which holds no tokens."""
    per_prompt = sorted((math.ceil(min(length + shape.max_tokens, max_model_len) / CPU_BLOCK_TOKENS)
                         for length in shape.prompt_lengths), reverse=True)
    sequences = [blocks for blocks in per_prompt[: shape.prompts] for _ in range(shape.n)][:max_num_seqs]
    return max(sum(sequences), math.ceil(max_model_len / CPU_BLOCK_TOKENS)) + NULL_BLOCKS


def auto_kv_cache_gib(model_path: str, dtype: str, shape: GenerationShape, *, max_model_len: int,
                      max_num_seqs: int | None = None) -> float:
    """The KV cache, in GiB, that holds the largest call of `shape` (a whole number of blocks: exact in bytes)."""
    blocks = cache_blocks(shape, max_model_len=max_model_len, max_num_seqs=max_num_seqs or CPU_MAX_NUM_SEQS)
    return blocks * CPU_BLOCK_TOKENS * kv_bytes_per_token(model_path, dtype) / 2**30
