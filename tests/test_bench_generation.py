"""scripts/bench_generation.py (docs/benchmarks.md, "Generation settings"): two settings on the tiny model, each
taken by vLLM as asked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_generation_runs_each_setting_as_vllm_takes_it(tmp_path, tiny_model_dir):
    out = tmp_path / "generation.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_generation.py"), "--model", str(tiny_model_dir),
                           "--prompts", "2", "--n", "2", "--max-tokens", "8", "--rounds", "1", "--warmup", "0",
                           "--force-full-length", "--settings", "defaults", "seqs-8", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the defaults' cache is sized to the batch: 4 sequences of <= 1 block, raised to one 1,024-token sequence:
    # 8 blocks, and vLLM's null block, x 128 tokens x 1 KiB a token (2 layers x K,V x 2 heads x 32 dims x 4 bytes)
    rows = {r["name"]: r for r in json.loads(out.read_text())["settings"]}
    assert [r["tokens"] for r in rows.values()] == [2 * 2 * 8] * 2
    assert {k: v for k, v in rows["defaults"]["applied"].items() if k != "torch_threads"} == \
        {"threads_bind": None, "kv_cache_gib": 9 * 2**17 / 2**30, "prefix_caching": True, "max_num_seqs": 256}
    assert rows["seqs-8"]["applied"]["max_num_seqs"] == 8
    assert "| seqs-8 | 8 sequences decoded at once | 32 |" in proc.stdout
