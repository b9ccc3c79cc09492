"""One Learner update alone, on a synthetic batch: its time, the matmul work it does against the work it must do,
and the rate of each matmul shape.

    python scripts/bench_update.py [--model DIR] [--prompts 8] [--n 8] [--max-tokens 128] [--full-length]
        [--repeats 3] [--compile] [--set KEY=VALUE ...] [--out runs/bench_update.json]

The training phase of `scripts/bench_trl.py` without generation, so a training lever is measured in a minute:
`--prompts` prompts of 35-55 random tokens, `--n` responses each, of 4-49 random tokens (natural lengths like the
default job's middle steps) or every one `--max-tokens` long (`--full-length`), seeded, the same batch for every
setting. Each of `--repeats` updates is timed (then the process's peak RSS and the matmul peak are read), then one
more runs under torch.profiler, which counts the FLOPs of
every matmul: "done" against "needed" (6 x the non-embedding parameters per distinct token, each group's prompt
once, and 6 x the LM head per response token: the count scripts/bench_trl.py rates training by). `--compile`
wraps each decoder layer's MLP and RMSNorms in torch.compile (dynamic shapes), the element-wise ops a compiler
could fuse. Writes the JSON; docs/benchmarks.md, "Where training's time goes".
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_trl, its sibling
PROMPT_TOKENS = (35, 56)  # a prompt's random length: [low, high)
NATURAL_TOKENS = (4, 50)  # a response's random length at natural lengths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model directory (default: SmolLM2-135M-Instruct from make setup)")
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts in the batch")
    p.add_argument("--n", type=int, default=8, help="responses per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="the batch's response width")
    p.add_argument("--full-length", action="store_true", help="every response --max-tokens long")
    p.add_argument("--repeats", type=int, default=3, help="timed updates (the median is reported)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer's MLP and RMSNorms")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_update.json", help="JSON results file")
    args = p.parse_args(argv)
    if args.model is None:
        from rlkit.models.prepare import default_model_dir

        args.model = str(default_model_dir())
    return args


def synthetic_batch(prompts: int, n: int, max_tokens: int, *, full_length: bool, vocab: int, seed: int):
    """A RolloutBatch of `prompts` x `n` rows with random ids below `vocab`, random advantages, behaviour
    logprobs of -3 (any value: only the ratio's denominator)."""
    from rlkit.batch import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    rand = lambda low, high: int(torch.randint(low, high, (1,), generator=g))  # noqa: E731
    rows = prompts * n
    prompt_ids = []
    for _ in range(prompts):  # prompts first: the same ones at natural or full length
        prompt_ids += [torch.randint(3, vocab, (rand(*PROMPT_TOKENS),), generator=g).tolist()] * n
    lengths = [max_tokens if full_length else min(rand(*NATURAL_TOKENS), max_tokens) for _ in range(rows)]
    ids, mask = torch.zeros(rows, max_tokens, dtype=torch.long), torch.zeros(rows, max_tokens)
    for i, length in enumerate(lengths):
        ids[i, :length] = torch.randint(3, vocab, (length,), generator=g)
        mask[i, :length] = 1
    group = torch.arange(rows) // n
    batch = RolloutBatch(prompt_ids=prompt_ids, response_ids=ids, response_mask=mask,
                         behavior_logprobs=torch.full((rows, max_tokens), -3.0), group_ids=group, prompt_index=group,
                         truncated=torch.zeros(rows, dtype=torch.bool), rows=[{}] * rows, texts=[""] * rows)
    batch.advantages = torch.randn(rows, 1, generator=g) * mask
    return batch


def needed_flops(model, batch) -> float:
    """scripts/bench_trl.py's count of the work an update must do: each distinct prompt once, every response token."""
    from bench_trl import training_flops_per_token

    responses = int(batch.response_mask.sum())
    prompts = sum(len(p) for p in {tuple(p): p for p in batch.prompt_ids}.values())
    return training_flops_per_token(model)(prompts + responses, responses)


def matmul_shapes(events) -> list[dict]:
    """torch.profiler's aten::mm records (grouped by input shape) -> one row per shape, slowest first."""
    rows = [{"shapes": e.input_shapes, "calls": e.count, "seconds": e.self_cpu_time_total / 1e6, "flops": e.flops}
            for e in events if e.key == "aten::mm"]
    for row in rows:
        row["gflops"] = row["flops"] / row["seconds"] / 1e9 if row["seconds"] else 0.0
    return sorted(rows, key=lambda r: -r["seconds"])


def compile_elementwise(model) -> None:
    """torch.compile (dynamic shapes) on each decoder layer's MLP and RMSNorms, in place."""
    from rlkit.trainer.logprobs import trunk

    for layer in trunk(model).layers:
        for module in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm):
            module.compile(dynamic=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from rlkit.config import build_plugins, compose
    from rlkit.trainer.learner import Learner
    from rlkit.trainer.metrics import process_memory_gib
    from rlkit.trainer.setup import make_accelerator

    from bench_trl import matmul_peak_gflops

    cfg = compose([f"model.path={args.model}", f"rollout.max_tokens={args.max_tokens}", *args.set])
    learner = Learner(cfg, build_plugins(cfg), make_accelerator(cfg))
    if args.compile:
        compile_elementwise(learner.model)
    batch = synthetic_batch(args.prompts, args.n, args.max_tokens, full_length=args.full_length,
                            vocab=learner.model.config.vocab_size, seed=args.seed)
    learner.update(batch)  # warm-up (and compilation)
    seconds = []
    for _ in range(args.repeats):
        tick = time.perf_counter()
        learner.update(batch)
        seconds.append(time.perf_counter() - tick)
    peak_rss, peak = process_memory_gib()[1], matmul_peak_gflops()  # before the profiler's records take memory
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        learner.update(batch)
    shapes = matmul_shapes(prof.key_averages(group_by_input_shape=True))
    needed, median = needed_flops(learner.model, batch), statistics.median(seconds)
    mm_seconds, mm_flops = sum(r["seconds"] for r in shapes), sum(r["flops"] for r in shapes)
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "response_tokens": int(batch.response_mask.sum()), "update_s": seconds, "median_s": median,
        "peak_rss_gib": peak_rss, "matmul_peak_gflops": peak,
        "needed_tflop": needed / 1e12, "train_gflops": needed / median / 1e9, "train_peak_frac": needed / median / 1e9 / peak,
        "profiled": {"total_s": sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e6, "matmul_s": mm_seconds,
                     "matmul_tflop_done": mm_flops / 1e12, "matmul_gflops": mm_flops / mm_seconds / 1e9 if mm_seconds else 0.0,
                     "shapes": shapes[:20]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    p = result["profiled"]
    print(f"update {median:.2f} s (median of {args.repeats}), {result['response_tokens']} response tokens; "
          f"{result['train_gflops']:.0f} GFLOP/s needed work = {100 * result['train_peak_frac']:.0f} % of "
          f"{peak:.0f}; peak RSS {result['peak_rss_gib']:.2f} GiB")
    print(f"profiled: matmuls {p['matmul_s']:.2f} of {p['total_s']:.2f} s, {p['matmul_tflop_done']:.3f} TFLOP done for "
          f"{result['needed_tflop']:.3f} needed, at {p['matmul_gflops']:.0f} GFLOP/s")
    for row in shapes[:8]:
        print(f"  {row['shapes']} x{row['calls']}: {row['seconds']:.3f} s at {row['gflops']:.0f} GFLOP/s")
    return result


if __name__ == "__main__":
    main()
