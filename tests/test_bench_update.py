"""scripts/bench_update.py (docs/benchmarks.md, "Where training's time goes"): its synthetic batch, the work it
counts as needed, and a run on the tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from scripts_dir import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_synthetic_batch_shares_each_prompt_among_its_responses():
    script = load_script("bench_update")
    batch = script.synthetic_batch(3, 4, 16, full_length=False, vocab=100, seed=0)
    assert len(batch) == 12 and batch.response_ids.shape == (12, 16)
    assert all(batch.prompt_ids[i] == batch.prompt_ids[i // 4 * 4] for i in range(12))
    assert all(35 <= len(p) < 56 for p in batch.prompt_ids)
    lengths = batch.response_mask.sum(-1)
    assert ((lengths >= 4) & (lengths <= 16)).all() and (batch.advantages[batch.response_mask == 0] == 0).all()
    full = script.synthetic_batch(3, 4, 16, full_length=True, vocab=100, seed=0)
    assert (full.response_mask == 1).all() and full.prompt_ids == batch.prompt_ids  # the same prompts


def test_needed_work_counts_each_distinct_prompt_once():
    # body 1,000 parameters (1,600 - a 600 embedding tied to the head), head 600; prompts of 2 and 3 tokens
    # shared by 2 responses each, 5 response tokens: 6 x 1,000 x (5 + 5) + 6 x 600 x 5 = 78,000
    model = torch.nn.Module()
    model.embed = torch.nn.Parameter(torch.zeros(600))
    model.rest = torch.nn.Parameter(torch.zeros(1000))
    model.config = SimpleNamespace(tie_word_embeddings=True)
    model.get_input_embeddings = model.get_output_embeddings = lambda: SimpleNamespace(weight=model.embed)
    batch = SimpleNamespace(prompt_ids=[[1, 2], [1, 2], [3, 4, 5], [3, 4, 5]],
                            response_mask=torch.tensor([[1, 1], [1, 0], [1, 0], [1, 0]]))
    assert load_script("bench_update").needed_flops(model, batch) == 78_000


def test_bench_update_runs_on_the_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "update.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_update.py"), "--model", str(tiny_model_dir),
                           "--prompts", "2", "--n", "2", "--max-tokens", "8", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["median_s"] > 0 and result["profiled"]["matmul_tflop_done"] > 0 and result["profiled"]["shapes"]
    assert result["train_peak_frac"] == result["train_gflops"] / result["matmul_peak_gflops"]
