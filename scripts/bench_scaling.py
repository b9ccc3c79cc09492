"""How one rlkit step's cost grows: step time and peak RSS against samples per prompt, new tokens and model size.

    python scripts/bench_scaling.py [--prompts 4] [--n 4 8 16] [--max-tokens 64 128 256]
        [--models tiny smollm2 smollm2-360m] [--base-n 8] [--base-tokens 128] [--base-model smollm2]
        [--steps 1] [--warmup 1] [--out runs/bench_scaling.json]

One dimension varies at a time around the base point (the others held at --base-*), every response forced to its
full length so that the work depends on the sizes alone. Each point is rlkit's half of `scripts/bench_trl.py`
(`--only rlkit --force-full-length`, rlkit's default levers) in a process of its own, so a point's peak RSS is its
whole footprint. Models: `tiny` (rlkit.models.tiny, 2 layers), `smollm2` (SmolLM2-135M-Instruct from `make setup`)
and `smollm2-360m` (SmolLM2-360M's shape, random weights, the 135M model's tokenizer: its cost, not its answers).
Prints one markdown table and writes the JSON (docs/benchmarks.md, "How cost grows").
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "bench_trl.py"
# SmolLM2-360M's architecture (its config.json on the hub): what a random-init stand-in needs.
SMOLLM2_360M = {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                "num_key_value_heads": 5, "head_dim": 64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=4, help="prompts per step at every point")
    p.add_argument("--n", type=int, nargs="+", default=[4, 8, 16], help="samples per prompt to vary over")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[64, 128, 256], help="new tokens to vary over")
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2", "smollm2-360m"],
                   choices=["tiny", "smollm2", "smollm2-360m"], help="models to vary over")
    p.add_argument("--base-n", type=int, default=8)
    p.add_argument("--base-tokens", type=int, default=128)
    p.add_argument("--base-model", default="smollm2", choices=["tiny", "smollm2", "smollm2-360m"])
    p.add_argument("--steps", type=int, default=1, help="measured steps per point (median)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per point")
    p.add_argument("--out", default="runs/bench_scaling.json")
    return p.parse_args(argv)


def points(args: argparse.Namespace) -> list[dict]:
    """The base point, then one dimension changed at a time (no point twice)."""
    base = {"model": args.base_model, "n": args.base_n, "max_tokens": args.base_tokens}
    grid = [base] + [{**base, "n": n} for n in args.n] + [{**base, "max_tokens": t} for t in args.max_tokens] + \
        [{**base, "model": m} for m in args.models]
    unique = []
    for point in grid:
        if point not in unique:
            unique.append(point)
    return unique


def model_dir(name: str, root: Path) -> Path:
    """The folder of model `name`, built under `root` where it is not prepared already."""
    from rlkit.models.prepare import default_model_dir

    if name == "smollm2":
        return default_model_dir()
    if name == "tiny":
        from rlkit.models.tiny import build_tiny_model

        return build_tiny_model(root / "tiny", tie_embeddings=True)
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    out = root / name
    config = AutoConfig.from_pretrained(default_model_dir())
    for key, value in SMOLLM2_360M.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(out)
    return out


def measure(point: dict, model: Path, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, str(BENCH), "--only", "rlkit", "--force-full-length", "--model", str(model),
           "--prompts", str(args.prompts), "--n", str(point["n"]), "--max-tokens", str(point["max_tokens"]),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out)]
    subprocess.run(cmd, check=True)
    rlkit = json.loads(out.read_text())["rlkit"]
    return {**point, "step_s": rlkit["median"]["step_s"], "generate_s": rlkit["median"]["generate"],
            "train_s": rlkit["median"]["train"], "tokens": rlkit["median"]["tokens"],
            "peak_rss_gib": rlkit["peak_rss_gib"], "train_peak_frac": rlkit["train_peak_frac"]}


def markdown(rows: list[dict], prompts: int) -> str:
    lines = [f"| model | prompts x n x new tokens | step (s) | generate (s) | train (s) | generated tokens "
             "| training % of matmul peak | peak RSS (GiB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {prompts} x {r['n']} x {r['max_tokens']} | {r['step_s']:.1f} | "
                     f"{r['generate_s']:.1f} | {r['train_s']:.1f} | {r['tokens']:.0f} | "
                     f"{100 * r['train_peak_frac']:.0f} % | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        models: dict[str, Path] = {}
        for i, point in enumerate(points(args)):
            if point["model"] not in models:
                models[point["model"]] = model_dir(point["model"], Path(tmp))
            print(f"== {point}", flush=True)
            rows.append(measure(point, models[point["model"]], args, Path(tmp) / f"point{i}.json"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"prompts": args.prompts, "steps": args.steps, "warmup": args.warmup,
                               "points": rows}, indent=2) + "\n")
    print(markdown(rows, args.prompts))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
