"""`python -m rlkit.plot runs/A [runs/B ...] [--out PNG] [--x step|time] [--smooth N]`: training curves, overlaid.

A run is a directory holding `metrics.jsonl` (or that file itself). A truncated last line, left by a run
that stopped mid-write, is skipped with a warning; any other unreadable input stops with one line that
names the file, the problem and the fix.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("rlkit.plot")
EVAL_KEY = re.compile(r"^eval/(.+)/pass@1$")


class MetricsError(ValueError):
    """A metrics file that cannot be plotted; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class Panel:
    key: str  # metric drawn as the curve
    title: str  # y-axis label
    spread: str | None = None  # standard deviation drawn as a band around the curve, clipped at 0 (lengths)
    smooth: bool = True  # whether --smooth applies (not to eval curves: each point is already a benchmark mean)
    constant: str = ""  # why the metric can be constant by construction, written when it never moves


TRAIN_PANELS = (
    Panel("reward/mean", "reward"),
    Panel("reward/accuracy", "accuracy"),
    Panel("response/length_mean", "response length (tokens, +-std)", spread="response/length_std"),
    Panel("actor/entropy", "entropy (nats/token)"),
    Panel("rollout/logprob_gap_mean", "|vLLM - trainer| logprob"),
    Panel("actor/kl", "KL to reference"),
    Panel("actor/clip_frac", "clip fraction", constant="exactly on-policy (one update per batch): the ratio is 1 "
                                                       "up to the logprob gap, so nothing is clipped"),
    Panel("time/step", "step time (s)"),
)


def metrics_path(run: Path) -> Path:
    """`run` itself when it is a file, else `run/metrics.jsonl`."""
    run = Path(run)
    return run if run.is_file() else run / "metrics.jsonl"


def read_metrics(run: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one dict per line, each with a "step"."""
    path = metrics_path(run)
    if not path.is_file():
        raise MetricsError(f"{path}: not found. Fix: pass a run directory (runs/<name>) that holds metrics.jsonl")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise MetricsError(f"{path}: not a text file. Fix: pass the metrics.jsonl that rlkit.train writes") from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for number, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == numbered[-1][0]:
                log.warning("%s: line %d is truncated (%s), skipped: the run stopped mid-write", path, number, err.msg)
                continue
            raise MetricsError(f"{path}: line {number} is not JSON ({err.msg}). "
                               "Fix: delete or repair that line") from None
        if not isinstance(row, dict) or "step" not in row:
            raise MetricsError(f"{path}: line {number} is not a metrics row (a JSON object with a \"step\"). "
                               "Fix: pass the metrics.jsonl that rlkit.train writes")
        rows.append(row)
    if not rows:
        raise MetricsError(f"{path}: holds no complete metrics line. Fix: plot the run after it has logged a step")
    return rows


def moving_average(values: list[float], n: int) -> list[float]:
    """Trailing mean over the last `n` values (fewer at the start): len(values) -> len(values)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def choose_panels(runs: list[list[dict]]) -> list[Panel]:
    """The panels worth drawing: metrics some run logged, accuracy only where it differs from the reward
    (for a 0/1 reward they are the same curve), then one panel per `eval/<benchmark>/pass@1`."""
    rows = [m for run in runs for m in run]
    panels = [p for p in TRAIN_PANELS if any(_numeric(m.get(p.key)) for m in rows)]
    same = all(abs(m["reward/mean"] - m["reward/accuracy"]) < 1e-6
               for m in rows if _numeric(m.get("reward/mean")) and _numeric(m.get("reward/accuracy")))
    if same and {p.key for p in panels} >= {"reward/mean", "reward/accuracy"}:
        panels = [Panel("reward/mean", "reward (= accuracy)") if p.key == "reward/mean" else p
                  for p in panels if p.key != "reward/accuracy"]
    benchmarks = sorted({match.group(1) for m in rows for key in m if (match := EVAL_KEY.match(key))})
    return panels + [Panel(f"eval/{b}/pass@1", f"eval {b} pass@1", smooth=False) for b in benchmarks]


def _x_values(rows: list[dict], x: str) -> list[float]:
    """Step numbers, or cumulative wall-clock minutes from `time/step`."""
    if x == "step":
        return [m["step"] for m in rows]
    xs, elapsed = [], 0.0
    for m in rows:
        elapsed += m.get("time/step", 0.0) / 60
        xs.append(elapsed)
    return xs


def constant_value(data: list[list[dict]], key: str) -> float | None:
    """The one value `key` takes in every row of every run, when it has at least two and never moves."""
    values = [m[key] for rows in data for m in rows if _numeric(m.get(key))]
    if len(values) >= 2 and max(values) - min(values) <= 1e-12 * max(1.0, abs(values[0])):
        return values[0]
    return None


def plot_runs(runs: list[Path], out: Path, *, x: str = "step", smooth: int = 1) -> Path:
    """Draw every run's curves into one PNG (`figure`)."""
    import matplotlib.pyplot as plt

    fig = figure(runs, x=x, smooth=smooth)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def figure(runs: list[Path], *, x: str = "step", smooth: int = 1):
    """The runs' curves as a matplotlib Figure, a panel per metric; with smooth > 1 a moving average over the
    faint raw curve. A panel whose metric never moves says so in words instead of drawing a flat line."""
    paths = [metrics_path(r) for r in runs]
    names = [p.parent.name if p.name == "metrics.jsonl" else p.stem for p in paths]
    labels = [name if names.count(name) == 1 else str(p) for name, p in zip(names, paths)]
    data = [read_metrics(r) for r in runs]
    panels = choose_panels(data)
    if not panels:
        raise MetricsError(f"{paths[0]}: none of the plotted metrics ({', '.join(p.key for p in TRAIN_PANELS)}) "
                           "is logged. Fix: pass the metrics.jsonl that rlkit.train writes")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    constants = {p.key: constant_value(data, p.key) for p in panels}
    cols = 2 if len(panels) > 4 else 1
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6.5 * cols, 2.3 * rows_n), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, rows) in enumerate(zip(labels, data)):
        color = colors[i % len(colors)]
        xs = _x_values(rows, x)
        for ax, panel in zip(axes.flat, panels):
            if constants[panel.key] is not None:
                continue
            points = [(xv, m[panel.key], m.get(panel.spread, 0.0))
                      for xv, m in zip(xs, rows) if _numeric(m.get(panel.key))]
            if not points:
                continue
            px, py, spread = (list(v) for v in zip(*points))
            n = smooth if panel.smooth else 1
            if n > 1:
                ax.plot(px, py, color=color, alpha=0.25, linewidth=0.8)
                py, spread = moving_average(py, n), moving_average(spread, n)
            ax.plot(px, py, color=color, marker="." if n == 1 else None, label=label)
            if panel.spread:
                low, high = [max(a - b, 0.0) for a, b in zip(py, spread)], [a + b for a, b in zip(py, spread)]
                ax.fill_between(px, low, high, color=color, alpha=0.15, linewidth=0)
    for ax, panel in zip(axes.flat, panels):
        ax.set_ylabel(panel.title, fontsize=8)
        ax.grid(alpha=0.3)
        if x == "step":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if constants[panel.key] is not None:
            ax.set_yticks([])
            words = "\n".join([f"{constants[panel.key]:g} at every logged step", *textwrap.wrap(panel.constant, 60)])
            ax.text(0.5, 0.5, words, transform=ax.transAxes, ha="center", va="center", fontsize=8)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for column in range(cols):  # the lowest drawn panel of each column carries the x axis
        ax = [a for a in axes[:, column] if a.get_visible()][-1]
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("step" if x == "step" else "wall-clock minutes")
    drawn = [ax for ax in axes.flat if ax.lines]
    if drawn:
        drawn[0].legend(fontsize=8)
    if smooth > 1:
        fig.suptitle(f"moving average over {smooth} steps (raw curves faint)", fontsize=9)
    fig.tight_layout()
    return fig


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1 (1: no smoothing)")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>) or their metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <first run>/curves.png)")
    parser.add_argument("--x", choices=("step", "time"), default="step", help="x axis: step or wall-clock minutes")
    parser.add_argument("--smooth", type=_positive, default=1, metavar="N",
                        help="draw a moving average over N steps over the faint raw curve (default 1: raw only)")
    args = parser.parse_args()
    logging.basicConfig(format="%(name)s: %(levelname)s: %(message)s", level=logging.WARNING)
    try:
        out = plot_runs(args.runs, args.out or metrics_path(args.runs[0]).parent / "curves.png",
                        x=args.x, smooth=args.smooth)
    except MetricsError as err:
        print(f"rlkit.plot: {err}", file=sys.stderr)
        sys.exit(2)
    print(out)


if __name__ == "__main__":
    main()
