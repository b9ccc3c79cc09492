"""Print (and plot) the phase timeline of runs from their metrics.jsonl (docs/async.md, "Measured").

    python scripts/async_timeline.py runs/<sync_run> runs/<async_run> ... [--plot timeline.png]

Per step: time/step and its parts; for an async run (trainer.max_staleness >= 1) also when the producer collected
the step's batch and when the learner began training it (seconds since the producer started), the learner's wait
for data, the producer's wait for weights, the batch's staleness and the queue depth. Ends with the mean step time
over the steps after the first (the first holds the verifier pool's start).

--plot PNG draws the same timeline: per run, one row a thread (producer: collecting each batch; learner: training
each batch, then pushing), bars on a shared time axis, each labelled with its step. A synchronous run has one row,
rebuilt from the step times (collect, then train and push, step after step).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(runs: list[str], plot: str | None = None) -> None:
    loaded = {run: [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
              for run in runs}
    for run, rows in loaded.items():
        print_table(run, [m for m in rows if "time/step" in m])
    if plot:
        draw(loaded, plot)


def print_table(run: str, rows: list[dict]) -> None:
    print(f"\n{run}")
    asynchronous = "async/staleness_max" in rows[0]
    head = f"{'step':>4} {'step_s':>7} {'gen_s':>6} {'rew_s':>6} {'train_s':>7} {'push_s':>6}"
    if asynchronous:
        head += (f" {'produce[begin,end]':>19} {'train_begin':>11} {'wait_data':>9} {'wait_wts':>8} "
                 f"{'stale':>5} {'queue':>5}")
    print(head)
    for m in rows:
        line = (f"{m['step']:>4} {m['time/step']:7.2f} {m['time/generate']:6.2f} {m['time/reward']:6.2f} "
                f"{m['time/train']:7.2f} {m['time/weight_push']:6.2f}")
        if asynchronous:
            line += (f"  [{m['time/produce_begin']:7.2f},{m['time/produce_end']:7.2f}] "
                     f"{m['time/train_begin']:11.2f} "
                     f"{m['time/learner_wait_data']:9.2f} {m['time/producer_wait_weights']:8.2f} "
                     f"{m['async/staleness_max']:5.0f} {m['async/queue_depth']:5.0f}")
        print(line)
    later = [m["time/step"] for m in rows[1:]]
    if later:
        print(f"mean time/step over steps 2..{len(rows)}: {sum(later) / len(later):.2f} s")


def phases(rows: list[dict]) -> dict[str, list[tuple[int, str, float, float]]]:
    """Thread name -> [(step, phase, begin_s, duration_s)]: collect, train and push intervals on one time axis."""
    if "time/produce_begin" not in rows[0]:  # synchronous: one loop, steps back to back
        bars, t = [], 0.0
        for m in rows:
            collect = m["time/generate"] + m["time/reward"]
            bars += [(m["step"], "collect", t, collect), (m["step"], "train", t + collect, m["time/train"]),
                     (m["step"], "push", t + collect + m["time/train"], m["time/weight_push"])]
            t += m["time/step"]
        return {"loop": bars}
    producer, learner = [], []
    for m in rows:
        begin, end = m["time/produce_begin"], m["time/produce_end"]
        producer.append((m["step"], "collect", begin, end - begin))
        trained = m["time/train_begin"] + m["time/train"]
        learner += [(m["step"], "train", m["time/train_begin"], m["time/train"]),
                    (m["step"], "push", trained + m.get("time/learner_wait_push", 0.0), m["time/weight_push"])]
    return {"producer": producer, "learner": learner}


def draw(loaded: dict[str, list[dict]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = {"collect": "tab:blue", "train": "tab:orange", "push": "tab:red"}
    lanes = [(run, thread, bars) for run, rows in loaded.items()
             for thread, bars in phases([m for m in rows if "time/step" in m]).items()]
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(lanes) + 1.5))
    for y, (_, _, bars) in enumerate(lanes):
        for step, phase, begin, width in bars:
            ax.barh(y, width, left=begin, height=0.6, color=colours[phase], edgecolor="black", linewidth=0.3)
            if phase != "push":
                ax.text(begin + width / 2, y, str(step), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(lanes)), [f"{Path(run).name}: {thread}" for run, thread, _ in lanes])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (async: since the producer started; synchronous: since the first step)")
    ax.legend(handles=[Patch(color=c, label=p) for p, c in colours.items()], loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (each holds metrics.jsonl)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the timeline to this image")
    args = parser.parse_args()
    main(args.runs, args.plot)
