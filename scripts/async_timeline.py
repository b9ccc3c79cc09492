"""Print the phase timeline of runs from their metrics.jsonl (docs/async.md, "Measured").

    python scripts/async_timeline.py runs/<sync_run> runs/<async_run> ...

Per step: time/step and its parts; for an async run (trainer.max_staleness >= 1) also when the producer collected
the step's batch and when the learner began training it (seconds since the producer started), the learner's wait
for data, the producer's wait for weights, the batch's staleness and the queue depth. Ends with the mean step time
over the steps after the first (the first holds the verifier pool's start).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(runs: list[str]) -> None:
    for run in runs:
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
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


if __name__ == "__main__":
    main(sys.argv[1:])
