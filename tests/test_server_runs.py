"""Training runs on the vllm_server engine with `launch: true`: the same run as colocated, and the launched
server is stopped when the run ends, fails to start, or is interrupted with SIGINT (nothing left behind)."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors.torch import load_file

from rlkit.rollout import create_engine
from rlkit.rollout.server_http import ServerError
from rlkit.rollout.server_launch import ServerProcess, free_port, serve_command
from rlkit.rollout.shm_transfer import BACKEND_NAME
from test_distributed import _assert_same_training, _metrics, launch
from test_trainer_e2e import run

COMMON = ["trainer.total_steps=3", "trainer.lr=1e-3", "reward.verifier=rl_tasks:contains_seven"]
SERVER = ["rollout=vllm_server", "rollout.engine.options.launch=true", "rollout.engine.options.max_model_len=256"]


def _server_group(port: int) -> int | None:
    """The process group of the server listening on `port` (its api_server's pid), if one runs."""
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "vllm.entrypoints.openai.api_server" in cmd and str(port) in cmd:
            return proc.info["pid"]
    return None


def _group_alive(pgid: int) -> bool:
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return False


@pytest.mark.slow
def test_the_same_run_on_a_launched_server_as_colocated(vllm_plugin_env, tmp_path, tiny_model_dir):
    served = run(tmp_path, tiny_model_dir, "served", *COMMON, *SERVER)
    colocated = run(tmp_path, tiny_model_dir, "colocated", *COMMON)
    assert "Application startup complete" in (tmp_path / "served" / "vllm_server.log").read_text()
    assert [m["rollout/weight_version"] for m in served] == [1.0, 2.0, 3.0]  # the initial weights pushed at start
    for s, c in zip(served, colocated):
        assert s["rollout/logprob_gap_max"] < 1e-4
        assert s["reward/mean"] == c["reward/mean"] and s["response/tokens"] == c["response/tokens"]
    a, b = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("served", "colocated"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.slow
def test_two_trainer_ranks_on_one_launched_server_train_what_one_colocated_process_trains(vllm_plugin_env, tmp_path,
                                                                                         tiny_model_dir):
    """Rank 0 launches the server and pushes; both ranks send their prompts and check every push's version."""
    launch(tmp_path, tiny_model_dir, "colocated", procs=1)
    launch(tmp_path, tiny_model_dir, "served_2", *SERVER, procs=2)
    _assert_same_training(tmp_path / "colocated", tmp_path / "served_2")
    assert [m["rollout/weight_version"] for m in _metrics(tmp_path / "served_2")] == [1.0, 2.0, 3.0, 4.0]
    log = (tmp_path / "served_2" / "vllm_server.log").read_text()
    assert log.count("Application startup complete") == 1
    port = log.split("--port ", 1)[1].split()[0]  # the command line heads the log
    assert _server_group(int(port)) is None  # stopped with the run


@pytest.mark.slow
def test_a_server_that_fails_to_start_shows_its_log(vllm_plugin_env, tmp_path, tiny_model_dir):
    port = free_port("127.0.0.1")
    shown = r"(?s)exited with code 2 .*last lines:.*unrecognized arguments: --no-such-flag"
    with pytest.raises(ServerError, match=shown):
        create_engine("vllm_server", str(tiny_model_dir), launch=True, port=port, extra_args=["--no-such-flag"],
                      log_file=str(tmp_path / "server.log"))
    assert _server_group(port) is None


@pytest.mark.slow
def test_sigint_stops_the_run_and_its_server(vllm_plugin_env, tmp_path, tiny_model_dir):
    port = free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "rlkit.train", f"model.path={tiny_model_dir}", f"logging.output_dir={tmp_path}",
           "logging.run_name=stopped", "trainer.total_steps=1000", "rollout.n=4", "rollout.max_tokens=16",
           "trainer.prompts_per_step=4", "reward.num_workers=1", "data.limit=64", "logging.progress_bar=false",
           "trainer.export_final=false", f"rollout.engine.options.port={port}", *COMMON[1:], *SERVER]
    trainer = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, pgid = tmp_path / "stopped" / "metrics.jsonl", None
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().strip()):
        assert trainer.poll() is None and time.monotonic() < deadline, trainer.stderr.read().decode()[-3000:]
        pgid = pgid or _server_group(port)
        time.sleep(0.5)
    assert pgid is not None
    trainer.send_signal(signal.SIGINT)
    _, err = trainer.communicate(timeout=180)
    assert trainer.returncode == 128 + signal.SIGINT
    assert b"stopped at step" in err, err.decode()[-2000:]
    assert not _group_alive(pgid)
    assert json.loads(metrics.read_text().splitlines()[0])["rollout/weight_version"] == 1.0


@pytest.fixture(scope="module")
def running_server(vllm_plugin_env, tiny_model_dir, tmp_path_factory):
    """The url of one server that the runs below share one after another, as a user's running server is."""
    port = free_port("127.0.0.1")
    server = ServerProcess(serve_command(str(tiny_model_dir), host="127.0.0.1", port=port, dtype="float32",
                                         max_model_len=1024, seed=0, backend=BACKEND_NAME, cuda=False,
                                         gpu_memory_utilization=0.4, extra_args=[]),
                           str(tmp_path_factory.mktemp("server") / "server.log"))
    url = f"http://127.0.0.1:{port}"
    server.wait_healthy(url, 600)
    yield url
    server.stop()


# Every recipe's sampler on the server: FR3E's prefixed continuations (smaller: 2 base responses, one branch point),
# Critique-GRPO's critiques and refinements (longer prompts), CAPO's top-k sampling.
RECIPES = {"grpo": [], "dr_grpo": [], "dapo": [], "opo": [], "grpo_lambda": [], "capo": [], "critique_grpo": [],
           "fr3e": ["algorithm.sampler.options.base_n=2", "algorithm.sampler.options.k=1", "algorithm.max_sample_rounds=1"]}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_runs_on_a_running_server(running_server, tmp_path, tiny_model_dir, recipe):
    metrics = run(tmp_path, tiny_model_dir, recipe, f"+recipe={recipe}", "trainer.total_steps=2", "trainer.lr=1e-3",
                  "reward.verifier=rl_tasks:contains_seven", "rollout=vllm_server",
                  f"rollout.engine.options.urls=[{running_server}]", *RECIPES[recipe])
    assert [m["rollout/weight_version"] for m in metrics] == [1.0, 2.0]  # the server held the last run's weights
    for m in metrics:  # CAPO samples from the top 50: the engine's logprobs are renormalised over them, the trainer's not
        assert (recipe == "capo" or m["rollout/logprob_gap_max"] < 1e-4) and m["batch/samples_trained"] > 0


@pytest.mark.slow
def test_truncated_importance_sampling_on_a_server_weighs_one_in_fp32(running_server, tmp_path, tiny_model_dir):
    """The mismatch correction on the server engine: fp32 server and trainer agree, so every weight is about 1."""
    metrics = run(tmp_path, tiny_model_dir, "tis", "trainer.total_steps=2", "trainer.lr=1e-3",
                  "reward.verifier=rl_tasks:contains_seven", "rollout=vllm_server",
                  f"rollout.engine.options.urls=[{running_server}]", "trainer.old_logprobs=recompute",
                  "algorithm.rollout_correction=tis")
    for m in metrics:
        assert m["rollout_correction/weight_mean"] == pytest.approx(1.0, abs=1e-3)
        assert m["rollout_correction/weight_max"] < 1.001 and m["rollout_correction/kept_frac"] == 1.0
