"""Push time to the colocated vLLM engine, full model vs LoRA's merged projections (docs/lora.md, "Measured").

    python scripts/bench_lora_push.py [--model DIR] [--r 16] [--pushes 3]

Loads the model (default: SmolLM2-135M-Instruct as `make setup` prepares it), wraps it with a LoRA adapter of
rank r (B set to small random values, as after training), starts vLLM, and times `engine.update_weights` with
(a) every weight merged (what a full push costs) and (b) `rlkit.trainer.lora.merged_weights` (LoRA's push: the decoder
layers' projections, merged). After (b) it checks the engine's logprobs against the trainer's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit.models.prepare import default_model_dir
from rlkit.rollout import SamplingConfig, create_engine
from rlkit.trainer import lora
from rlkit.trainer.logprobs import policy_logprobs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(default_model_dir()))
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--pushes", type=int, default=3)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    peft = lora.wrap(model, OmegaConf.create({"r": args.r, "alpha": 2 * args.r, "dropout": 0.0, "target_modules": None}))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-3)
    engine = create_engine("vllm", args.model, max_model_len=512)
    try:
        timings = {}
        for label, weights in (("every_weight", lambda: lora.merged_weights(peft, every_weight=True)),  # as a full push, merged
                               ("projections", lambda: lora.merged_weights(peft))):
            numel = sum(t.numel() for _, t in weights())
            times = []
            for _ in range(args.pushes):
                start = time.perf_counter()
                engine.update_weights(weights())
                times.append(time.perf_counter() - start)
            timings[label] = times
            print(f"{label}: {numel / 1e6:.1f}M values pushed, median {statistics.median(times):.3f} s "
                  f"(runs: {', '.join(f'{t:.3f}' for t in times)})")
        prompts = [AutoTokenizer.from_pretrained(args.model)("What is 2 + 3?")["input_ids"]]
        out = engine.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_tokens=32, seed=0))
        gaps = []
        for c in out:
            ids = torch.tensor([c.token_ids])
            with torch.no_grad():
                mine = policy_logprobs(peft, prompts, ids, torch.ones_like(ids, dtype=torch.float32), pad_id=0).logprobs
            gaps.append(float((mine[0] - torch.tensor(c.logprobs)).abs().max()))
        print(f"engine vs trainer after the LoRA push: max |logprob gap| {max(gaps):.2e}")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
