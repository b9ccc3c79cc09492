"""The vllm_server engine on real `vllm serve` processes (loopback, tiny model), and its pieces without one.

Two servers start once for the module (launch mode of the engine itself and a bare `ServerProcess`); the
tests share them, the last one kills the second. The server finds rlkit's weight-transfer backend through the
`vllm.general_plugins` entry point; conftest's `vllm_plugin_env` declares it on PYTHONPATH (no reinstall).
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlkit.rollout import SamplingConfig, create_engine
from rlkit.rollout.server_http import ServerClient, ServerError
from rlkit.rollout.server_launch import ServerProcess, free_port, serve_command, serve_env
from rlkit.rollout.shm_transfer import BACKEND_NAME, SharedMemoryWriter, views
from test_weight_sync import _sample, _train_one_step, _trainer_logprobs

PROMPTS = [[11, 12, 13, 14], [20, 21], [30, 31, 32, 33, 34, 35], [40, 41, 42]]


# ---------------------------------------------------------------------------------------------- no server
def test_shared_memory_layout_round_trips(tmp_path):
    tensors = [("a", torch.randn(3, 5)), ("b", torch.arange(7)), ("c", torch.randn(2, dtype=torch.bfloat16))]
    writer = SharedMemoryWriter(str(tmp_path))
    layout = writer.write(tensors)
    assert all(offset % 64 == 0 for offset in layout["offsets"])
    mapped = torch.from_file(layout["path"], shared=True, size=layout["size"], dtype=torch.uint8)
    for (name, t), (got_name, got) in zip(tensors, views(mapped, layout)):
        assert name == got_name and got.dtype == t.dtype and torch.equal(got, t)
    writer.close()
    assert not Path(layout["path"]).exists()


def test_a_new_writer_removes_the_files_of_writers_no_longer_running(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"rlkit-weights-{int(gone.stdout)}-0badc0de.bin"  # its writer was SIGKILLed, say
    running = tmp_path / f"rlkit-weights-{os.getpid()}-12345678.bin"  # another writer of this process, still open
    other = tmp_path / "rlkit-weights-notes.bin"  # not a writer's name
    for path in (orphan, running, other):
        path.write_bytes(b"x" * 64)
    writer = SharedMemoryWriter(str(tmp_path))
    assert not orphan.exists() and running.exists() and other.exists()
    writer.write([("a", torch.ones(2))])
    assert writer.path.exists() and writer.path != running
    writer.close()


def test_engine_needs_urls_or_launch_not_both(tiny_model_dir):
    for options in ({}, {"urls": ["http://127.0.0.1:1"], "launch": True}):
        with pytest.raises(ValueError, match="either urls"):
            create_engine("vllm_server", str(tiny_model_dir), **options)


def test_misspelt_engine_lists_every_engine():
    with pytest.raises(KeyError, match="did you mean 'vllm'.*known: hf, vllm, vllm_server"):
        create_engine("vlm", "model")


def test_unreachable_server_fails_within_the_deadline_naming_it():
    url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    started = time.monotonic()
    with pytest.raises(ServerError, match=f"{url}.*failed [0-9]+ attempt.*timeout_s=2"):
        ServerClient(url, timeout_s=2).get("/health")
    assert time.monotonic() - started < 4


def test_serve_command_has_what_rlkit_needs():
    cmd = serve_command("/m", host="127.0.0.1", port=9, dtype="float32", max_model_len=256, seed=3,
                        backend=BACKEND_NAME, cuda=False, gpu_memory_utilization=0.4, extra_args=["--x"])
    line = " ".join(cmd)
    assert "--logprobs-mode processed_logprobs" in line and '{"backend": "rlkit_shm"}' in line
    assert "--no-enable-chunked-prefill" in line and cmd[-1] == "--x"


def test_a_launched_cpu_server_gets_a_small_kv_cache_unless_told(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    assert serve_env(cuda=False) == {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}"}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    assert serve_env(cuda=False)["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert serve_env(cuda=True) == {}


# ---------------------------------------------------------------------------------------------- real servers
@pytest.fixture(scope="module")
def servers(vllm_plugin_env, tiny_model_dir, tmp_path_factory):
    """(launched engine, second server's url, second ServerProcess), started at the same time."""
    logs = tmp_path_factory.mktemp("logs")
    port = free_port("127.0.0.1")
    second = ServerProcess(serve_command(str(tiny_model_dir), host="127.0.0.1", port=port, dtype="float32",
                                         max_model_len=256, seed=0, backend=BACKEND_NAME, cuda=False,
                                         gpu_memory_utilization=0.4, extra_args=[]), str(logs / "second.log"))
    engine = create_engine("vllm_server", str(tiny_model_dir), launch=True, max_model_len=256,
                           log_file=str(logs / "first.log"), timeout_s=60)
    url = f"http://127.0.0.1:{port}"
    second.wait_healthy(url, 600)
    yield engine, url, second
    process = engine.process
    engine.close()
    second.stop()
    assert not process.alive() and not second.alive()


@pytest.mark.slow
def test_pushed_weights_match_trainer_on_the_server(servers, tiny_model_dir):
    engine, _, _ = servers
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    batch = _sample(engine, PROMPTS, 1.0, seed=1)
    assert ((_trainer_logprobs(model, batch, 1.0) - batch.behavior_logprobs).abs() * batch.response_mask).max() < 1e-4
    again = _sample(engine, PROMPTS, 1.0, seed=1)
    assert torch.equal(again.response_ids, batch.response_ids)  # a seed gives the same samples
    _train_one_step(model)
    stale = _sample(engine, PROMPTS, 1.0, seed=2)
    assert ((_trainer_logprobs(model, stale, 1.0) - stale.behavior_logprobs).abs()).max() > 1e-2
    engine.update_weights(model.state_dict().items())
    assert set(engine.versions().values()) == {engine.expected_version}
    for temperature in (1.0, 0.7):
        batch = _sample(engine, PROMPTS, temperature, seed=3)
        gap = (_trainer_logprobs(model, batch, temperature) - batch.behavior_logprobs).abs() * batch.response_mask
        assert gap.max() < 1e-4
    assert engine.step_metrics() == {"rollout/weight_version": 1.0}


@pytest.mark.slow
def test_a_server_that_missed_a_push_is_caught(servers, tiny_model_dir):
    engine, _, _ = servers
    first = engine.clients[0]
    other = create_engine("vllm_server", str(tiny_model_dir), urls=[first.url], timeout_s=30)
    try:  # another run's engine expects a fresh server; this one holds `engine`'s pushes
        with pytest.raises(ServerError, match="did not take the weights.*expected version 'default'"):
            other.generate(PROMPTS, SamplingConfig(n=2, max_tokens=4, seed=0))
    finally:
        other.close()
    first.post("/update_weight_version", json={"new_version": "stale"})  # as if the last push never arrived
    with pytest.raises(ServerError, match=f"{first.url} reports 'stale'"):
        engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=4, seed=0))
    first.post("/update_weight_version", json={"new_version": engine.expected_version})


@pytest.mark.slow
def test_two_servers_share_the_prompts_and_both_take_the_weights(servers, tiny_model_dir):
    engine, url, _ = servers
    both = create_engine("vllm_server", str(tiny_model_dir), urls=[engine.clients[0].url, url], timeout_s=30)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    _train_one_step(model, lr=1e-2)
    try:
        sent = {c.url: 0 for c in both.clients}
        for client in both.clients:
            post = client.post

            def counting(path, *args, _post=post, _url=client.url, **kwargs):
                sent[_url] += path == "/v1/completions"
                return _post(path, *args, **kwargs)

            client.post = counting
        both.update_weights(model.state_dict().items())
        assert set(both.versions().values()) == {both.expected_version}
        batch = _sample(both, PROMPTS, 1.0, seed=4)
        assert list(sent.values()) == [2, 2]
        gap = (_trainer_logprobs(model, batch, 1.0) - batch.behavior_logprobs).abs() * batch.response_mask
        assert gap.max() < 1e-4  # each server sampled from the pushed weights
    finally:
        both.close()
        engine.clients[0].post("/update_weight_version", json={"new_version": engine.expected_version})


@pytest.mark.slow
def test_a_killed_server_is_reported_within_the_deadline(servers, tiny_model_dir):
    _, url, second = servers
    engine = create_engine("vllm_server", str(tiny_model_dir), urls=[url], timeout_s=5)
    try:
        engine.update_weights(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items())
        engine.generate(PROMPTS[:1], SamplingConfig(n=1, max_tokens=4, seed=0))
        os.killpg(second.proc.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ServerError, match=f"{url}.*failed [0-9]+ attempt"):
            engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=4, seed=0))
        assert time.monotonic() - started < 12
    finally:
        engine.close()


@pytest.mark.slow
def test_a_launched_server_that_dies_is_reported_at_once_with_its_log(servers):
    """Last in this module: it kills the launched server the tests above share."""
    engine, _, _ = servers
    os.killpg(engine.process.proc.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"(?s)exited with code -9; log .*first.log, last lines"):
        engine.generate(PROMPTS, SamplingConfig(n=2, max_tokens=4, seed=0))
    assert time.monotonic() - started < 10  # not retried to the 60 s deadline
