"""Compare methods at an equal budget of generated tokens, then evaluate each final policy.

    python scripts/compare_methods.py --budget 12000 --methods grpo opo grpo_lambda --out runs/compare

Each method is a training run (`python -m rlkit.train`) with the same seed, data and model, stopped by
`trainer.max_generated_tokens` (every token the engine generated counts, also FR3E's base trajectories
and Critique-GRPO's critiques); then `python -m rlkit.eval` on its final policy: greedy accuracy on the
arithmetic test split and pass@1/pass@4/maj@4 at temperature 1. Writes <out>/summary.json and
<out>/curves.png (reward, response length, entropy, prompts solved, CAPO's rejected fraction and the policy
shift per step, against generated tokens); `--plot RUN...` redraws the figure for some finished runs;
`--table OUT...` prints the results of finished comparisons (one OUT per seed) as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# name -> training overrides (recipes and compositions of docs/methods.md)
METHODS: dict[str, list[str]] = {
    "grpo": ["+recipe=grpo"],
    "opo": ["+recipe=opo"],
    "grpo_lambda": ["+recipe=grpo_lambda"],
    # The recipe's warmup is a tenth of trainer.total_steps, which a budget-stopped run sets huge: 2 steps instead
    # (its cosine then decays over those 100000 steps, so the rate stays near the peak for the whole budget).
    "capo": ["+recipe=capo", "trainer.warmup_steps=2"],
    "fr3e": ["+recipe=fr3e"],
    "critique_grpo": ["+recipe=critique_grpo"],
}
PANELS = (("reward/fresh_mean", "reward of fresh samples"), ("response/length_mean", "response length (tokens)"),
          ("actor/entropy", "entropy (nats/token)"), ("reward/prompts_solved_frac", "prompts with >= 1 correct sample"),
          ("capo/rejected_frac", "CAPO rejected fraction: all tokens (solid), A > 0 (--), A < 0 (:)"),
          ("actor/policy_shift_k3", "policy shift per step (k3, log scale)"))
# Extra lines in a panel: key -> (metric, line style) drawn in the run's colour.
SPLITS = {"capo/rejected_frac": (("capo/rejected_frac_pos", "--"), ("capo/rejected_frac_neg", ":"))}


def _run(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        subprocess.run([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def train(name: str, overrides: list[str], budget: int, seed: int, out: Path, extra: list[str]) -> float:
    return _run(["-m", "rlkit.train", *overrides, f"seed={seed}", f"trainer.max_generated_tokens={budget}",
                 "trainer.total_steps=100000", "trainer.save_every=0", "logging.progress_bar=false",
                 f"logging.output_dir={out}", f"logging.run_name={name}", *extra], out / f"{name}.train.log")


def evaluate(name: str, out: Path, limit: int, sampled_limit: int, trained: bool = True) -> dict:
    """Evaluate run `name`'s final policy, or the configured base model when not `trained`."""
    model = [f"model.path={out / name / 'final'}"] if trained else []
    results = {}
    for mode, count, overrides in (("greedy", limit, ["eval.temperature=0", "eval.n=1", "eval.k=[1]"]),
                                   ("sampled", sampled_limit, ["eval.temperature=1.0", "eval.n=4", "eval.k=[1,4]"])):
        target = out / f"{name}.eval.{mode}"
        _run(["-m", "rlkit.eval", *model, "eval.benchmarks=[arithmetic]",
              f"eval.limit={count}", f"eval.output_dir={target}", *overrides], out / f"{name}.eval.{mode}.log")
        results[mode] = json.loads((target / "eval.json").read_text())["metrics"]["arithmetic"]
    return results


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def plot(out: Path, names: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    colours = {name: f"C{i}" for i, name in enumerate(names)}
    for ax, (key, title) in zip(axes.flat, PANELS):
        for name in names:
            for metric, style in ((key, "-"), *SPLITS.get(key, ())):
                rows = [m for m in read_metrics(out / name) if metric in m and "rollout/generated_tokens_total" in m]
                if rows:
                    ax.plot([m["rollout/generated_tokens_total"] for m in rows], [m[metric] for m in rows],
                            marker=".", linestyle=style, color=colours[name], label=name if style == "-" else None)
        if key == "actor/policy_shift_k3" and ax.lines:
            ax.set_yscale("log")
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged by these runs", ha="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("generated tokens")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def table(outs: list[Path]) -> str:
    """A markdown table of the runs in the summaries of ``outs`` (one directory per seed): each cell
    gives the seeds' values in the order of ``outs``, separated by " / ", then their mean for evaluations."""
    summaries = [json.loads((out / "summary.json").read_text()) for out in outs]
    names = sorted(dict.fromkeys(name for summary in summaries for name in summary), key=lambda name: name != "base")
    rows = ["| run | steps | generated tokens | greedy | greedy length | T=1 pass@1 | T=1 pass@4 | T=1 maj@4 "
            "| fresh reward, first -> last step | entropy, first -> last step |", "|" + "---|" * 10]

    def cell(values: list[float], mean: bool = True) -> str:
        if not mean:
            return " / ".join(f"{v:.0f}" for v in values)
        text = " / ".join(f"{v:.3f}" for v in values)
        return f"{text} (mean {sum(values) / len(values):.3f})" if len(values) > 1 else text

    for name in names:
        runs = [(out, summary[name]) for out, summary in zip(outs, summaries) if name in summary]
        evals = [run["eval"] for _, run in runs]
        columns = [cell([e["greedy"]["pass@1"] for e in evals]),
                   " / ".join(f"{e['greedy']['length_mean']:.1f}" for e in evals)]
        columns += [cell([e["sampled"][k] for e in evals]) for k in ("pass@1", "pass@4", "maj@4")]
        if name == "base":
            rows.append(f"| base model | - | - | {' | '.join(columns)} | - | - |")
            continue
        reward_key = "reward/fresh_mean"  # comparable across samplers (FR3E's branches, refinements left out)
        metrics = [read_metrics(out / name) for out, _ in runs]
        steps = cell([run["steps"] for _, run in runs], mean=False)
        tokens = cell([run["generated_tokens"] for _, run in runs], mean=False)
        reward = ", ".join(f"{m[0][reward_key]:.2f} -> {m[-1][reward_key]:.2f}" for m in metrics)
        entropy = ", ".join(f"{m[0]['actor/entropy']:.2f} -> {m[-1]['actor/entropy']:.2f}" for m in metrics)
        rows.append(f"| {name} | {steps} | {tokens} | {' | '.join(columns)} | {reward} | {entropy} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=list(METHODS),
                        help=f"any of {list(METHODS)} (none: only the --lr runs)")
    parser.add_argument("--budget", type=int, default=12000, help="generated tokens per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-limit", type=int, default=200, help="arithmetic test prompts, greedy")
    parser.add_argument("--sampled-limit", type=int, default=100, help="arithmetic test prompts, 4 samples at T=1")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every method's run")
    parser.add_argument("--lr", action="append", default=[], metavar="NAME=LR",
                        help="a run NAME@LR of method NAME at this learning rate (e.g. grpo=1e-4)")
    parser.add_argument("--base", action="store_true", help="also evaluate the untrained model (as run 'base')")
    parser.add_argument("--plot", nargs="+", metavar="RUN", help="only plot these finished runs (no training)")
    parser.add_argument("--plot-out", type=Path, help="the figure's path (default <out>/curves.png)")
    parser.add_argument("--table", nargs="+", type=Path, metavar="OUT",
                        help="only print a markdown table of these finished comparisons (one --out per seed)")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    figure = args.plot_out or args.out / "curves.png"
    if args.plot:
        print("plot:", plot(args.out, args.plot, figure))
        return
    runs = {name: METHODS[name] for name in args.methods}
    for spec in args.lr:
        name, lr = spec.split("=")
        runs[f"{name}@{lr}"] = [*METHODS[name], f"trainer.lr={lr}"]
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if args.base and "base" not in summary:
        summary["base"] = {"eval": evaluate("base", args.out, args.eval_limit, args.sampled_limit, trained=False)}
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print("base", json.dumps(summary["base"]), flush=True)
    for name, overrides in runs.items():
        if (args.out / name / "final").is_dir() and name in summary:
            continue  # done by an earlier invocation
        if (args.out / name / "final").is_dir():  # trained, not yet evaluated: its logged step times
            seconds = sum(m.get("time/step", 0.0) for m in read_metrics(args.out / name))
        else:
            seconds = train(name, overrides, args.budget, args.seed, args.out, args.extra)
        metrics = read_metrics(args.out / name)
        summary[name] = {"overrides": [*overrides, *args.extra], "budget": args.budget, "seed": args.seed,
                         "train_seconds": seconds, "steps": metrics[-1]["step"],
                         "generated_tokens": metrics[-1]["rollout/generated_tokens_total"],
                         "reward_first2": sum(m["reward/fresh_mean"] for m in metrics[:2]) / min(2, len(metrics)),
                         "reward_last3": sum(m["reward/fresh_mean"] for m in metrics[-3:]) / min(3, len(metrics)),
                         "eval": evaluate(name, args.out, args.eval_limit, args.sampled_limit)}
        summary_path.write_text(json.dumps(summary, indent=1) + "\n")
        print(name, json.dumps(summary[name]), flush=True)
    print("plot:", plot(args.out, [name for name in summary if name != "base"], figure))


if __name__ == "__main__":
    main()
