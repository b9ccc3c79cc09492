"""The fp32 matmul rate a model's own training products reach on this CPU, against large square products.

    python scripts/bench_matmul.py [--model DIR] [--tokens 1024] [--seconds 1.0] [--out runs/bench_matmul.json]

docs/benchmarks.md rates training against 2048 x 2048 products. What training runs is, for each linear layer
[in -> out] of the model, a forward product [tokens, in] @ [in, out] and two backward ones: the input's gradient
[tokens, out] @ [out, in] and the weight's [out, tokens] @ [tokens, in], laid out as autograd lays them out
(an nn.Linear weight is stored [out, in]). This times each distinct layer shape's three products at `--tokens`
rows (a micro-batch's tokens) and reports their GFLOP/s and the rate of one forward+backward through the whole
model (every shape counted as often as the model has it; the LM head at `--head-tokens` rows), as a fraction of
the square products' rate: the most training's matmuls can reach here at this micro-batch size.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model directory (default: SmolLM2-135M-Instruct from make setup)")
    p.add_argument("--tokens", type=int, default=1024, help="rows of every decoder product (a micro-batch's tokens)")
    p.add_argument("--head-tokens", type=int, default=None, help="rows of the LM head's products (default: --tokens)")
    p.add_argument("--seconds", type=float, default=1.0, help="time each product for about this long")
    p.add_argument("--out", default="runs/bench_matmul.json", help="JSON results file")
    args = p.parse_args(argv)
    if args.model is None:
        from rlkit.models.prepare import default_model_dir

        args.model = str(default_model_dir())
    return args


def layer_shapes(config) -> dict[str, tuple[int, int, int]]:
    """name -> (in, out, how many) of a Llama-style decoder's linear layers and its LM head."""
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    ff = config.intermediate_size
    return {"q_proj": (d, q, layers), "k_proj, v_proj": (d, kv, 2 * layers), "o_proj": (q, d, layers),
            "gate_proj, up_proj": (d, ff, 2 * layers), "down_proj": (ff, d, layers), "lm_head": (d, config.vocab_size, 1)}


def rate(product, flops: int, seconds: float) -> float:
    """GFLOP/s of `product()` (a zero-argument matmul) repeated for about `seconds` after one warm-up call."""
    product()
    count, tick = 0, time.perf_counter()
    while time.perf_counter() - tick < seconds:
        product()
        count += 1
    return flops * count / (time.perf_counter() - tick) / 1e9


def measure(shapes: dict, tokens: int, head_tokens: int, seconds: float) -> list[dict]:
    import torch

    rows = []
    for name, (n_in, n_out, count) in shapes.items():
        m = head_tokens if name == "lm_head" else tokens
        x, w, g = torch.randn(m, n_in), torch.randn(n_out, n_in), torch.randn(m, n_out)
        flops = 2 * m * n_in * n_out
        products = {"forward": lambda: x @ w.t(), "input_grad": lambda: g @ w, "weight_grad": lambda: g.t() @ x}
        rows.append({"name": name, "in": n_in, "out": n_out, "count": count, "rows": m, "flops": flops,
                     **{k: rate(p, flops, seconds) for k, p in products.items()}})
    return rows


def model_rate(rows: list[dict]) -> float:
    """GFLOP/s of one forward+backward through every layer: all its products' FLOPs over all their times."""
    flops = sum(3 * r["flops"] * r["count"] for r in rows)
    seconds = sum(r["flops"] * r["count"] * sum(1 / r[k] for k in ("forward", "input_grad", "weight_grad"))
                  for r in rows) / 1e9
    return flops / seconds / 1e9


def markdown(result: dict) -> str:
    lines = ["| layer | in -> out | per model | rows | forward | input grad | weight grad (GFLOP/s) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["layers"]:
        lines.append(f"| {r['name']} | {r['in']} -> {r['out']} | {r['count']} | {r['rows']} | {r['forward']:.0f} | "
                     f"{r['input_grad']:.0f} | {r['weight_grad']:.0f} |")
    lines.append(f"\nthe model's forward+backward products: {result['model_gflops']:.0f} GFLOP/s, "
                 f"{100 * result['fraction_of_square']:.0f} % of {result['square_gflops']:.0f} GFLOP/s "
                 f"(2048 x 2048 products), {result['torch_threads']} threads")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoConfig

    from bench_trl import matmul_peak_gflops

    args = parse_args(argv)
    shapes = layer_shapes(AutoConfig.from_pretrained(args.model))
    rows = measure(shapes, args.tokens, args.head_tokens or args.tokens, args.seconds)
    square = matmul_peak_gflops(seconds=3 * args.seconds)
    result = {"model": args.model, "tokens": args.tokens, "torch_threads": torch.get_num_threads(), "layers": rows,
              "model_gflops": model_rate(rows), "square_gflops": square}
    result["fraction_of_square"] = result["model_gflops"] / square
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
