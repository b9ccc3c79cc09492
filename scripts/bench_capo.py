"""Cost of CAPO's token mask per training step (the figures in docs/algorithms.md, "CAPO").

Times `Trainer.update` (forward, mask, loss, backward, optimizer step) on one fixed batch of
prompts x n responses x tokens (random token ids, every response at full length, random advantages),
with the mask off (`none`), CAPO with the SGD direction and CAPO with the Adam direction (after one
warm-up step, so the Adam model has moments). Variants alternate within each repetition so that other
jobs on a shared machine slow them alike; the mask's own time is measured around its call.

    .venv/bin/python scripts/bench_capo.py --model tiny
    .venv/bin/python scripts/bench_capo.py --model smollm2 --prompts 8 --n 8 --tokens 64 --repeat 1 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rlkit.algorithms.plugins import TOKEN_MASKS
from rlkit.batch import RolloutBatch
from rlkit.config import compose
from rlkit.registry import PluginSpec
from rlkit.trainer.trainer import Trainer

VARIANTS = {"none": PluginSpec("none"), "capo-sgd": PluginSpec("capo", {"direction": "sgd"}),
            "capo-adam": PluginSpec("capo", {"direction": "adam"})}


class TimedMask:
    """A built token mask whose calls are timed (seconds summed in `spent`)."""

    def __init__(self, plugin):
        self.plugin, self.capabilities, self.spent = plugin, plugin.capabilities, 0.0

    def __call__(self, inputs):
        tick = time.perf_counter()
        keep = self.plugin(inputs)
        self.spent += time.perf_counter() - tick
        return keep

    def __getattr__(self, name):
        return getattr(self.plugin, name)


def synthetic_batch(vocab: int, prompts: int, n: int, tokens: int, prompt_len: int, seed: int) -> RolloutBatch:
    gen = torch.Generator().manual_seed(seed)
    size = prompts * n
    prompt_ids = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(prompts)]
    advantages = torch.randn(size, 1, generator=gen).expand(size, tokens).contiguous()
    return RolloutBatch(
        prompt_ids=[prompt_ids[i // n] for i in range(size)],
        response_ids=torch.randint(0, vocab, (size, tokens), generator=gen), response_mask=torch.ones(size, tokens),
        behavior_logprobs=torch.zeros(size, tokens), group_ids=torch.arange(size) // n,
        prompt_index=torch.arange(size) // n, truncated=torch.ones(size, dtype=torch.bool),
        rows=[{}] * size, texts=[""] * size, advantages=advantages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 (the default config's model) | a model directory")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="response tokens per sample")
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 gives steadier timings on a machine shared with other jobs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["rollout.engine=hf", "reward.num_workers=0", "data.limit=8", "logging.progress_bar=false",
                     f"logging.output_dir={tmp}", "logging.run_name=bench", f"rollout.max_tokens={args.tokens}",
                     f"trainer.micro_batch_size={args.micro_batch_size}", "trainer.save_every=0"]
        if args.model == "tiny":
            from rlkit.models.tiny import build_tiny_model

            overrides.append(f"model.path={build_tiny_model(Path(tmp) / 'tiny')}")
        elif args.model != "smollm2":
            overrides.append(f"model.path={args.model}")
        trainer = Trainer(compose(overrides))
        vocab = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight.shape[0]
        batch = synthetic_batch(vocab, args.prompts, args.n, args.tokens, args.prompt_len, seed=0)
        masks = {name: TimedMask(TOKEN_MASKS.build(spec)) for name, spec in VARIANTS.items()}
        step_s = {name: [] for name in VARIANTS}
        mask_s = {name: [] for name in VARIANTS}
        for repetition in range(args.repeat + 1):  # the first pass warms up (and gives Adam its moments)
            for name, mask in masks.items():
                trainer.plugins["algorithm.token_mask"] = mask
                mask.spent = 0.0
                tick = time.perf_counter()
                trainer.update(batch)
                elapsed = time.perf_counter() - tick
                mask.plugin.step_metrics()
                if repetition:
                    step_s[name].append(elapsed)
                    mask_s[name].append(mask.spent)
        trainer.close()

    tokens = args.prompts * args.n * args.tokens
    base = statistics.median(step_s["none"])
    print(f"model={args.model} batch={args.prompts}x{args.n}x{args.tokens} ({tokens} response tokens), "
          f"micro_batch_size={args.micro_batch_size}, repeat={args.repeat}, threads={torch.get_num_threads()}")
    print(f"{'variant':<10} {'step s (median)':>16} {'step s (min)':>13} {'mask s (median)':>16} {'mask/step':>10} {'vs none':>8}")
    for name in VARIANTS:
        step, mask = statistics.median(step_s[name]), statistics.median(mask_s[name])
        print(f"{name:<10} {step:>16.3f} {min(step_s[name]):>13.3f} {mask:>16.3f} {mask / step:>10.1%} "
              f"{step / base - 1:>+8.1%}")


if __name__ == "__main__":
    main()
