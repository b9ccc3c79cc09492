"""`python -m rlkit.plot runs/A [runs/B ...] [--out PNG]`: training curves of one or more runs, overlaid."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (
    ("reward/mean", "reward"),
    ("reward/accuracy", "accuracy"),
    ("response/length_mean", "response length (tokens)"),
    ("actor/entropy", "entropy (nats/token)"),
    ("actor/kl", "KL to reference"),
    ("actor/clip_frac", "clip fraction"),
    ("time/step", "step time (s)"),
)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a run directory (runs/<name>) that has metrics")
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def plot_runs(run_dirs: list[Path], out: Path, *, x: str = "step") -> Path:
    """One panel per metric that any run logged; x is "step" or "time" (cumulative wall-clock minutes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {Path(d).name: read_metrics(d) for d in run_dirs}
    panels = [(key, title) for key, title in PANELS if any(key in m for rows in runs.values() for m in rows)]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True, squeeze=False)
    for name, rows in runs.items():
        xs, elapsed = [], 0.0
        for m in rows:
            elapsed += m.get("time/step", 0.0) / 60
            xs.append(m["step"] if x == "step" else elapsed)
        for ax, (key, title) in zip(axes[:, 0], panels):
            points = [(xv, m[key]) for xv, m in zip(xs, rows) if key in m]
            if points:
                ax.plot(*zip(*points), marker=".", label=name)
            ax.set_ylabel(title, fontsize=8)
            ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step" if x == "step" else "wall-clock minutes")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <first run>/curves.png)")
    parser.add_argument("--x", choices=("step", "time"), default="step", help="x axis: step or wall-clock minutes")
    args = parser.parse_args()
    out = plot_runs(args.runs, args.out or args.runs[0] / "curves.png", x=args.x)
    print(out)


if __name__ == "__main__":
    main()
