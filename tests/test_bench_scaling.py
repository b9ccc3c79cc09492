"""scripts/bench_scaling.py (docs/benchmarks.md, "How cost grows"): its grid and a one-point run on the tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts_dir import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_scaling.py"


def _script():
    return load_script("bench_scaling")


def test_the_grid_varies_one_dimension_at_a_time_around_the_base():
    bench = _script()
    grid = bench.points(bench.parse_args(["--n", "4", "8", "--max-tokens", "64", "128", "--models", "tiny", "smollm2"]))
    base = {"model": "smollm2", "n": 8, "max_tokens": 128}
    assert grid == [base, {**base, "n": 4}, {**base, "max_tokens": 64}, {**base, "model": "tiny"}]


@pytest.mark.slow
def test_bench_scaling_measures_a_point_on_the_tiny_model(tmp_path):
    out = tmp_path / "scaling.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--base-model", "tiny", "--n", "2",
                           "--base-n", "2", "--max-tokens", "8", "--base-tokens", "8", "--prompts", "2", "--steps", "1",
                           "--warmup", "0", "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [point] = json.loads(out.read_text())["points"]
    assert point["tokens"] == 2 * 2 * 8 and point["step_s"] > 0 and point["peak_rss_gib"] > 0.1
    assert "| tiny | 2 x 2 x 8 |" in proc.stdout
