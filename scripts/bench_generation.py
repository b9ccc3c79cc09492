"""How vLLM's CPU settings change rlkit's generation: threads, KV cache size, prefix caching, batch size.

    python scripts/bench_generation.py [--model DIR] [--prompts 8] [--n 8] [--max-tokens 128] [--rounds 3]
        [--warmup 1] [--force-full-length] [--settings NAME ...] [--out runs/bench_generation.json]

Each setting runs in a process of its own (threads and vLLM's environment are read at start): rlkit's colocated engine
(`rollout=vllm`, the default config's options) with the setting's engine options or environment, generating the
default job's first batch (its prompts, n, temperature, max tokens). Every round samples with the same seed, so
every round decodes the same tokens; the prefix cache is reset between rounds, as a weight push resets it.
Reports the engine's settings as vLLM took them, generated tokens, the median seconds and tokens/s of the rounds
after warm-up, and the process's resident memory after the engine started (docs/benchmarks.md, "Generation settings").
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name: (environment, engine options, torch threads or None, what it changes)
SETTINGS = {
    "defaults": ({}, {}, None, "rlkit's defaults: torch's threads (every core), the KV cache sized to the batch "
                               "(auto), prefix caching, vLLM's 256 sequences"),
    "threads-1": ({}, {}, 1, "one torch thread (the engine runs on the process's torch threads)"),
    "bind-auto": ({"VLLM_CPU_OMP_THREADS_BIND": "auto"}, {}, None, "VLLM_CPU_OMP_THREADS_BIND=auto"),
    "bind-none": ({"VLLM_CPU_OMP_THREADS_BIND": "nobind"}, {}, None, "VLLM_CPU_OMP_THREADS_BIND=nobind"),
    "bind-1-core": ({"VLLM_CPU_OMP_THREADS_BIND": "0"}, {}, None, "VLLM_CPU_OMP_THREADS_BIND=0 (one core)"),
    "kv-0.25": ({}, {"kv_cache_gib": 0.25}, None, "KV cache 0.25 GiB"),
    "kv-0.5": ({}, {"kv_cache_gib": 0.5}, None, "KV cache 0.5 GiB"),
    "kv-1": ({}, {"kv_cache_gib": 1.0}, None, "KV cache 1 GiB (the default before auto)"),
    "kv-2": ({}, {"kv_cache_gib": 2.0}, None, "KV cache 2 GiB"),
    "no-prefix-cache": ({}, {"enable_prefix_caching": False}, None, "prefix caching off"),
    "seqs-8": ({}, {"max_num_seqs": 8}, None, "8 sequences decoded at once"),
    "seqs-16": ({}, {"max_num_seqs": 16}, None, "16 sequences decoded at once"),
    "seqs-32": ({}, {"max_num_seqs": 32}, None, "32 sequences decoded at once"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model directory (default: SmolLM2-135M-Instruct from make setup)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    p.add_argument("--n", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=128, help="max new tokens per sample")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per setting (median)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds per setting")
    p.add_argument("--force-full-length", action="store_true", help="every response runs to --max-tokens")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="settings to run")
    p.add_argument("--only", choices=list(SETTINGS), default=None, help="run one setting in this process")
    p.add_argument("--out", default="runs/bench_generation.json", help="JSON results file")
    args = p.parse_args(argv)
    if args.model is None:
        from rlkit.models.prepare import default_model_dir

        args.model = str(default_model_dir())
    return args


def first_batch(cfg) -> list[list[int]]:
    """The prompt ids of the default job's first batch (its data, order and prompt format)."""
    from transformers import AutoTokenizer

    from rlkit.data import PromptStream, build_prompt
    from rlkit.trainer.trainer import training_rows

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    rows = PromptStream(training_rows(cfg), cfg.trainer.prompts_per_step, cfg.seed).next_batch()
    return [build_prompt(tokenizer, row["question"], template=cfg.data.template, system_prompt=cfg.data.system_prompt,
                         use_chat_template=cfg.data.use_chat_template) for row in rows]


def run_setting(args: argparse.Namespace, name: str) -> dict:
    from bench_trl import rss_gib, suppress_eos

    from rlkit.config import compose, spec_at
    from rlkit.rollout import GenerationShape, SamplingConfig, make_engine

    import torch

    env, options, threads, _ = SETTINGS[name]
    for key in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"):  # the setting alone decides them
        os.environ.pop(key, None)
    os.environ.update(env)
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = compose([f"model.path={args.model}", "rollout=vllm", f"trainer.prompts_per_step={args.prompts}",
                   f"rollout.n={args.n}", f"rollout.max_tokens={args.max_tokens}"] +
                  [f"rollout.engine.options.{key}={value}" for key, value in options.items()])
    prompts = first_batch(cfg)
    started = time.perf_counter()
    shape = GenerationShape(tuple(len(p) for p in prompts), len(prompts), cfg.rollout.n, cfg.rollout.max_tokens)
    engine = make_engine(spec_at(cfg, "rollout.engine"), cfg.model.path, cfg.rollout.dtype or cfg.model.dtype, shape)
    setup_s, setup_rss = time.perf_counter() - started, rss_gib()
    vllm_config = engine.llm.llm_engine.vllm_config
    applied = {"torch_threads": torch.get_num_threads(), "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
               "kv_cache_gib": vllm_config.cache_config.kv_cache_memory_bytes / 2**30,
               "prefix_caching": vllm_config.cache_config.enable_prefix_caching,
               "max_num_seqs": vllm_config.scheduler_config.max_num_seqs}
    if args.force_full_length:
        suppress_eos(engine)
    sampling = SamplingConfig(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                              top_k=cfg.rollout.top_k, max_tokens=cfg.rollout.max_tokens, seed=cfg.seed)
    rounds = []
    for _ in range(args.warmup + args.rounds):
        engine.llm.reset_prefix_cache()
        started = time.perf_counter()
        completions = engine.generate(prompts, sampling)
        rounds.append({"seconds": time.perf_counter() - started, "tokens": sum(len(c.token_ids) for c in completions)})
    engine.close()
    measured = rounds[args.warmup:]
    seconds = statistics.median(r["seconds"] for r in measured)
    return {"name": name, "env": env, "options": options, "applied": applied, "setup_s": setup_s, "rss_after_setup_gib": setup_rss,
            "rounds": rounds, "seconds": seconds, "tokens": measured[0]["tokens"],
            "tokens_per_s": measured[0]["tokens"] / seconds}


def markdown(rows: list[dict]) -> str:
    lines = ["| setting | what | generated tokens | seconds | tokens/s | vs defaults | RSS after start (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    base = next((r for r in rows if r["name"] == "defaults"), None)
    for r in rows:
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        lines.append(f"| {r['name']} | {SETTINGS[r['name']][3]} | {r['tokens']} | {r['seconds']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {ratio} | {r['rss_after_setup_gib']:.2f} |")
    return "\n".join(lines)


def child_argv(args: argparse.Namespace, name: str, out: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--prompts", str(args.prompts),
            "--n", str(args.n), "--max-tokens", str(args.max_tokens), "--rounds", str(args.rounds),
            "--warmup", str(args.warmup), "--only", name, "--out", str(out)] + \
        ["--force-full-length"] * args.force_full_length


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.only is not None:
        Path(args.out).write_text(json.dumps(run_setting(args, args.only)) + "\n")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_generation_") as tmp:
        for name in args.settings:
            print(f"== {name}", flush=True)
            part = Path(tmp) / f"{name}.json"
            subprocess.run(child_argv(args, name, part), check=True)
            rows.append(json.loads(part.read_text()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": args.prompts, "n": args.n, "max_tokens": args.max_tokens,
                               "force_full_length": args.force_full_length, "rounds": args.rounds,
                               "warmup": args.warmup, "cores": os.cpu_count(), "settings": rows}, indent=2) + "\n")
    print(markdown(rows))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
