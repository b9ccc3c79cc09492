"""End to end on the tiny model with the vLLM engine: every recipe runs, resume is exact, the policy learns."""
import json

import pytest
import torch
from safetensors.torch import load_file

from rlkit.config import compose
from rlkit.validation import validate
from rlkit.errors import ConfigError
from rlkit.trainer.trainer import Trainer

TINY = [
    "rollout.n=4",
    "rollout.max_tokens=16",
    "rollout.engine.options.max_model_len=256",
    "trainer.prompts_per_step=4",
    "trainer.micro_batch_size=8",
    "reward.num_workers=1",
    "data.limit=64",
    "logging.progress_bar=false",
]


def run(tmp_path, model_dir, name, *overrides):
    cfg = compose([f"model.path={model_dir}", f"logging.output_dir={tmp_path}", f"logging.run_name={name}",
                   *TINY, *overrides])
    validate(cfg)
    Trainer(cfg).fit()
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("recipe", ["grpo", "dr_grpo", "dapo"])
def test_recipe_runs_three_steps(tmp_path, tiny_model_dir, recipe):
    metrics = run(tmp_path, tiny_model_dir, recipe, f"+recipe={recipe}", "trainer.total_steps=3",
                  "rollout.n=4", "reward.verifier=rl_tasks:contains_seven", "logging.tensorboard=true")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["rollout/logprob_gap_max"] < 1e-4  # the engine samples from exactly the trained weights
        assert m["response/tokens"] > 0 and m["time/step"] > 0
    assert (tmp_path / recipe / "checkpoints" / "step_3" / "model" / "model.safetensors").is_file()
    assert any((tmp_path / recipe / "tb").glob("events.out.tfevents.*"))
    samples = (tmp_path / recipe / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 3 * 4 and {"kind", "question", "answer", "response", "reward"} <= json.loads(samples[0]).keys()
    exported = load_file(tmp_path / recipe / "final" / "model.safetensors")
    initial = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(exported[k], initial[k]) for k in initial)  # the policy moved


def test_resume_continues_exactly(tmp_path, tiny_model_dir):
    common = ["trainer.total_steps=4", "trainer.lr=1e-3", "reward.verifier=rl_tasks:contains_seven"]
    straight = run(tmp_path, tiny_model_dir, "straight", *common, "trainer.save_every=0")
    first = run(tmp_path, tiny_model_dir, "split", *common, "trainer.save_every=2", "trainer.total_steps=2")
    resumed = run(tmp_path, tiny_model_dir, "split", *common, "trainer.save_every=2", "trainer.resume=auto")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    timing = ("time/", "perf/")
    for a, b in zip(straight, resumed):
        for key, value in a.items():
            if not key.startswith(timing):
                assert b[key] == pytest.approx(value, abs=1e-6), (a["step"], key)
    assert first[-1]["step"] == 2
    w_straight = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    w_resumed = load_file(tmp_path / "split" / "final" / "model.safetensors")
    for key in w_straight:
        torch.testing.assert_close(w_resumed[key], w_straight[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_reward_rises_on_easy_task(tmp_path, tiny_model_dir):
    metrics = run(tmp_path, tiny_model_dir, "learn", "trainer.total_steps=20", "trainer.lr=3e-3",
                  "rollout.n=8", "trainer.prompts_per_step=8", "trainer.micro_batch_size=32",
                  "reward.verifier=rl_tasks:contains_seven", "trainer.save_every=0")
    rewards = [m["reward/mean"] for m in metrics]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.25, rewards
    assert max(m["rollout/logprob_gap_max"] for m in metrics) < 1e-4


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reward_service_gives_the_same_run_as_in_process(tmp_path, tiny_model_dir):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    port = _free_port()
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "rlkit.reward.serve", "--port", str(port), "--workers", "1",
                               "--verifier", "rl_tasks:contains_seven"], env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "service did not start"
            time.sleep(0.2)
        common = ["trainer.total_steps=2", "trainer.lr=1e-3", "reward.verifier=rl_tasks:contains_seven"]
        remote = run(tmp_path, tiny_model_dir, "remote", *common, f"reward.url=http://127.0.0.1:{port}")
        local = run(tmp_path, tiny_model_dir, "local", *common)
    finally:
        server.terminate()
        server.wait(30)
    assert [m["reward/mean"] for m in remote] == [m["reward/mean"] for m in local]
    assert [m["actor/pg_loss"] for m in remote] == pytest.approx([m["actor/pg_loss"] for m in local], abs=1e-7)


def test_unreachable_reward_service_stops_the_run_at_start(tmp_path, tiny_model_dir):
    port = _free_port()  # nothing listens here
    with pytest.raises(ConfigError, match=f"reward.url: nothing is listening at http://127.0.0.1:{port} "):
        run(tmp_path, tiny_model_dir, "down", f"reward.url=http://127.0.0.1:{port}", "reward.retries=1")
