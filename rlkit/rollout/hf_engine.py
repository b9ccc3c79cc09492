"""transformers `generate` as a rollout engine: slow, simple, for debugging and parity checks."""
from __future__ import annotations

from typing import Iterable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlkit.rollout.base import Completion, SamplingConfig


class HFEngine:
    """Its own copy of the model; prompts are left-padded and sampled in one batch."""

    def __init__(self, model_path: str, *, dtype: str = "float32", device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        self.model.eval()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos_ids = set(_as_list(self.model.generation_config.eos_token_id) or [tokenizer.eos_token_id])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        config = GenerationConfig(
            do_sample=sampling.temperature > 0,
            temperature=sampling.temperature if sampling.temperature > 0 else None,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,  # 0: off (None would mean the default 50)
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=sampling.n,
            eos_token_id=sorted(self.eos_ids | set(sampling.stop_token_ids)),
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_scores=True,
        )
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), generation_config=config
            )
        new_tokens = out.sequences[:, width:].cpu()
        # Scores are the processed logits (after temperature / top-k / top-p): the sampling distribution.
        logprobs = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1).cpu()
        sampled = logprobs.gather(-1, new_tokens[..., None])[..., 0]
        stop_ids = self.eos_ids | set(sampling.stop_token_ids)
        completions = []
        for row in range(new_tokens.shape[0]):
            tokens = new_tokens[row].tolist()
            end = next((i + 1 for i, t in enumerate(tokens) if t in stop_ids), None)
            length = end if end is not None else len(tokens)
            completions.append(
                Completion(
                    row // sampling.n,
                    tokens[:length],
                    sampled[row, :length].tolist(),
                    "stop" if end is not None else "length",
                )
            )
        return completions

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.model.load_state_dict(dict(named_tensors), strict=False)

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        self.model = None


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
