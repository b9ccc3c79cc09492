"""scripts/bench_matmul.py (docs/benchmarks.md): the layer shapes it reads from a config, how it combines their
rates, and a run on the tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from scripts_dir import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_layer_shapes_of_a_grouped_query_decoder():
    config = SimpleNamespace(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=None, intermediate_size=128, vocab_size=1000)
    assert load_script("bench_matmul").layer_shapes(config) == {
        "q_proj": (64, 64, 3), "k_proj, v_proj": (64, 32, 6), "o_proj": (64, 64, 3),
        "gate_proj, up_proj": (64, 128, 6), "down_proj": (128, 64, 3), "lm_head": (64, 1000, 1)}


def test_model_rate_is_all_flops_over_all_time():
    # a: 1 GFLOP a product, 2 of them, at 10, 20 and 20 GFLOP/s: 2 x (0.1 + 0.05 + 0.05) = 0.4 s for 6 GFLOP;
    # b: 3 GFLOP once, at 30 GFLOP/s each: 0.3 s for 9 GFLOP. 15 GFLOP in 0.7 s.
    rows = [{"flops": 1e9, "count": 2, "forward": 10.0, "input_grad": 20.0, "weight_grad": 20.0},
            {"flops": 3e9, "count": 1, "forward": 30.0, "input_grad": 30.0, "weight_grad": 30.0}]
    assert abs(load_script("bench_matmul").model_rate(rows) - 15 / 0.7) < 1e-9


def test_bench_matmul_runs_on_the_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "matmul.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_matmul.py"), "--model", str(tiny_model_dir),
                           "--tokens", "64", "--seconds", "0.02", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["layers"]][-1] == "lm_head" and result["model_gflops"] > 0
    assert result["fraction_of_square"] == result["model_gflops"] / result["square_gflops"]
    assert "| lm_head |" in proc.stdout
