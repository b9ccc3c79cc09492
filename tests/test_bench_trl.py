"""scripts/bench_trl.py (docs/benchmarks.md) runs both halves, rlkit and TRL, and reads the settings it shares
from rlkit's config where they live now."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts_dir import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_trl.py"


def _script():
    return load_script("bench_trl")


def _config(bench, tiny_model_dir, tmp_path, *extra):
    args = bench.parse_args(["--model", str(tiny_model_dir), "--prompts", "2", "--n", "2", *extra])
    return bench.shared_config(args, str(tmp_path))


def test_clip_range_reads_the_policy_loss_options(tiny_model_dir, tmp_path):
    bench = _script()
    cfg = _config(bench, tiny_model_dir, tmp_path)
    assert bench.clip_range(cfg) == (0.2, 0.2)  # ppo_clip's defaults
    cfg.algorithm.policy_loss = {"name": "ppo_clip", "options": {"eps_high": 0.28}}
    assert bench.clip_range(cfg) == (0.2, 0.28)
    cfg.algorithm.policy_loss = {"name": "ppo_clip", "options": {"dual_clip_c": 3.0}}
    with pytest.raises(SystemExit, match="single PPO clip"):
        bench.clip_range(cfg)
    cfg.algorithm.policy_loss = {"name": "critique", "options": {}}
    with pytest.raises(SystemExit, match="critique"):
        bench.clip_range(cfg)


def test_rlkit_levers_reach_the_config_and_the_child_processes(tiny_model_dir, tmp_path):
    bench = _script()
    cfg = _config(bench, tiny_model_dir, tmp_path)
    assert (cfg.trainer.shared_prompt_forward, cfg.trainer.padding_free, cfg.trainer.micro_batch_tokens,
            cfg.trainer.micro_batch_size) == (True, True, 1024, None)  # rlkit's defaults
    assert bench.parse_args(["--model", str(tiny_model_dir), "--prompts", "2", "--n", "2"]).trl_micro_batch == 4  # 8, capped
    rows_only = _config(bench, tiny_model_dir, tmp_path, "--micro-batch-tokens", "0")
    assert (rows_only.trainer.micro_batch_tokens, rows_only.trainer.micro_batch_size) == (None, 8)
    levers = ["--shared-prompt", "off", "--padding-free", "off", "--micro-batch-tokens", "300", "--micro-batch", "2",
              "--set", "rollout.engine.options.enable_prefix_caching=false", "--set", "trainer.logprob_chunk_tokens=64"]
    cfg = _config(bench, tiny_model_dir, tmp_path, *levers)
    assert (cfg.trainer.shared_prompt_forward, cfg.trainer.padding_free, cfg.trainer.micro_batch_tokens,
            cfg.trainer.micro_batch_size) == (False, False, 300, 2)
    assert cfg.rollout.engine.options.enable_prefix_caching is False and cfg.trainer.logprob_chunk_tokens == 64
    args = bench.parse_args(["--model", str(tiny_model_dir), *levers])
    child = bench.parse_args(bench.child_argv(args, "rlkit", "out.json")[2:])
    assert (child.micro_batch_tokens, child.micro_batch, child.padding_free, child.shared_prompt, child.set) == \
        (300, 2, "off", "off", ["rollout.engine.options.enable_prefix_caching=false", "trainer.logprob_chunk_tokens=64"])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="TRL not installed (pip install --no-deps trl==1.16.0; `make setup` does)")
def test_bench_trl_runs_both_frameworks(tiny_model_dir, tmp_path):
    """One step of each framework, 2 prompts x 2 samples x 8 tokens at forced full length (about 50 s)."""
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny_model_dir), "--prompts", "2", "--n", "2",
                           "--max-tokens", "8", "--steps", "1", "--warmup", "0", "--force-full-length", "--profile",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("rlkit", "trl"):
        assert result[name]["median"]["tokens"] == 2 * 2 * 8  # every response forced to 8 tokens
        assert result[name]["median"]["train"] > 0
        assert result[name]["peak_rss_gib"] > 0.1  # the whole process: torch alone is more
    assert result["ratio"]["step_time"] > 0
    assert result["rlkit"]["matmul_peak_gflops"] > 0 and result["rlkit"]["train_gflops"] > 0
    # every phase sampled, none above the process's peak (within 1 %: the kernel's high-water mark lags VmRSS)
    memory = result["rlkit"]["memory_gib"]
    assert set(memory["peak_by_phase"]) >= {"collect", "train"} and memory["after_setup"] > memory["before_setup"]
    assert max(memory["peak_by_phase"].values()) <= 1.01 * result["rlkit"]["peak_rss_gib"]
    assert memory["optimizer_state"] == pytest.approx(2 * memory["gradients"], rel=1e-3)  # AdamW: 2 moments a weight
    step = result["rlkit"]["steps"][0]  # 2 prompts, each once, and 2 x 2 responses of 8 tokens
    assert step["tokens_trained"] - step["tokens_trained_distinct"] == 2 * (step["tokens_trained"] - 32) / 4
    assert result["rlkit"]["train_profile_s"]["matmul"] > 0 and "other" in result["rlkit"]["train_profile_s"]
    assert "TRL / rlkit step time" in proc.stdout
