"""trainer.max_staleness (docs/async.md): the producer thread against a stand-in trainer (the bound, the bounded
queue, dropping stale batches, stopping), then real runs on one shared `vllm serve` (CPU, tiny model): k = 1
trains exactly what k = 0 trains when the producer is slower than the learner, a slow learner sees staleness 1
and a waiting producer, validation refusals, and Ctrl-C during an async run."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from rlkit.config import compose
from rlkit.validation import validate
from rlkit.errors import ConfigError
from rlkit.rollout.server_launch import free_port
from rlkit.trainer.async_rollouts import PRODUCER_PLUGINS, AsyncRollouts, collected_before_push
from rlkit.trainer.trainer import Trainer
from scripts_dir import load_script
from test_server_runs import COMMON, SERVER, _group_alive, _server_group, running_server  # noqa: F401 (fixture)
from test_trainer_e2e import TINY, run


# ---------------------------------------------------------------------- the producer against a stand-in trainer
class _Plugin:
    stateful = False

    def step_metrics(self):
        return {}


class FakeTrainer:
    """What AsyncRollouts reads of a Trainer; each batch has 4 samples; `stamp` may change a batch's version."""

    def __init__(self, total_steps, train_s=0.0, collect_s=0.0, stamp=None):
        self.cfg = OmegaConf.create({"trainer": {"total_steps": total_steps}})
        self.step = self.next_batch = self.next_group_id = self.generated_tokens = 0
        self.stream = SimpleNamespace(state_dict=lambda: {}, load_state_dict=lambda state: None)
        self.plugins = {key: _Plugin() for key in PRODUCER_PLUGINS}
        self.engine_lock, self.engine_version, self.engine = threading.Lock(), 0, object()
        self.learner = SimpleNamespace(version=0)
        self.train_s, self.collect_s, self.stamp = train_s, collect_s, stamp or (lambda index, version: version)
        self.trained = []  # (learner version, batch index, metrics)
        self.rollouts = None  # set by _train: train_on calls its before_push, as Trainer.train_on does

    def collect_batch(self, index, first_group_id, version, *, token_stats):
        assert token_stats is None  # the producer never reads the live learner
        time.sleep(self.collect_s)
        batch = SimpleNamespace(policy_version=torch.full((4,), self.stamp(index, version)))
        return SimpleNamespace(batch=_Sized(batch), next_group_id=first_group_id + 1, generated_tokens=10,
                               index=index)

    def train_on(self, collected, start, produced):
        time.sleep(self.train_s)
        self.trained.append((self.learner.version, collected.index, produced))
        self.learner.version += 1
        self.rollouts.before_push()
        with self.engine_lock:
            self.engine_version = self.learner.version
        self.step += 1
        return produced


class _Sized:
    def __init__(self, batch):
        self.policy_version = batch.policy_version

    def __len__(self):
        return len(self.policy_version)


def _train(trainer, k, steps, schedule="eager", carried=()):
    rollouts = trainer.rollouts = AsyncRollouts(trainer, k, schedule, carried)
    try:
        return [rollouts.train_step() for _ in range(steps)], rollouts
    finally:
        rollouts.stop()


def test_a_slow_learner_makes_the_producer_wait_within_the_bound():
    trainer = FakeTrainer(total_steps=6, train_s=0.3)
    metrics, rollouts = _train(trainer, 2, 6)
    assert [index for _, index, _ in trainer.trained] == list(range(6))
    assert [m["async/staleness_max"] for m in metrics] == [0, 1, 2, 2, 2, 2]  # never more than k
    assert all(m["async/queue_depth"] <= 2 for m in metrics)
    assert sum(m["time/producer_wait_weights"] for m in metrics) > 0.5  # it waited instead of drawing ahead
    assert not rollouts.thread.is_alive()


def test_a_slow_producer_gives_staleness_zero():
    trainer = FakeTrainer(total_steps=4, collect_s=0.2)
    slow = AsyncRollouts.before_batch

    def wait_for_the_learner(self, index):  # slower than the learner: it starts a batch once the learner is idle
        with self.changed:
            self.changed.wait_for(lambda: self.finished >= index or self.stopping.is_set())

    AsyncRollouts.before_batch = wait_for_the_learner
    try:
        metrics, _ = _train(trainer, 1, 4)
    finally:
        AsyncRollouts.before_batch = slow
    assert [m["async/staleness_max"] for m in metrics] == [0, 0, 0, 0]
    assert all(m["time/learner_wait_data"] > 0.1 for m in metrics)


def test_collected_before_push():
    assert collected_before_push(0, 1) == 2  # done with batch 0, k=1: batch 1 is still version 0's
    assert collected_before_push(5, 2) == 8  # done with batch 5, k=2: batches 6 and 7 are version 5's


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("speeds", [{"train_s": 0.1}, {"collect_s": 0.1}], ids=["slow_learner", "slow_producer"])
def test_fixed_schedule_samples_batch_i_with_version_i_minus_k_at_any_speed(k, speeds):
    trainer = FakeTrainer(total_steps=5, **speeds)
    metrics, rollouts = _train(trainer, k, 5, "fixed")
    assert [m["async/policy_version"] for m in metrics] == [max(0, i - k) for i in range(5)]
    # the last push waited for the k batches its predecessor's weights sample: a checkpoint holds them
    assert [item.index for item in rollouts.checkpoint_in_flight()] == list(range(5, 5 + k))
    assert [item.version for item in rollouts.checkpoint_in_flight()] == [max(0, i - k) for i in range(5, 5 + k)]


def test_fixed_schedule_resumes_with_the_batches_in_flight():
    first = FakeTrainer(total_steps=3, train_s=0.05)
    _, rollouts = _train(first, 1, 3, "fixed")
    carried = rollouts.checkpoint_in_flight()  # batch 3, sampled by version 2
    resumed = FakeTrainer(total_steps=5, collect_s=0.05)
    resumed.step = resumed.learner.version = resumed.engine_version = resumed.next_batch = 3
    metrics, _ = _train(resumed, 1, 2, "fixed", carried)
    assert [(m["async/batch_index"], m["async/policy_version"]) for m in metrics] == [(3, 2), (4, 3)]
    assert _train(FakeTrainer(total_steps=3), 1, 1, "eager")[1].checkpoint_in_flight() == []  # drawn again


def test_stale_batches_are_dropped_and_counted():
    stale = {2}  # batch 2 claims weights 3 versions old: beyond k=1, it must not be trained
    trainer = FakeTrainer(total_steps=4, train_s=0.05, stamp=lambda i, v: v - 3 if i in stale else v)
    metrics, rollouts = _train(trainer, 1, 4)
    assert [index for _, index, _ in trainer.trained] == [0, 1, 3, 4]
    assert [m["async/dropped_stale"] for m in metrics] == [0, 0, 4, 0]
    assert metrics[-1]["async/dropped_stale_total"] == 4
    assert all(m["async/staleness_max"] <= 1 for m in metrics)
    assert rollouts.consumed["next_batch"] == 5  # a checkpoint here would not draw the dropped batch again


def test_stop_ends_a_waiting_producer_at_once():
    trainer = FakeTrainer(total_steps=100)
    rollouts = trainer.rollouts = AsyncRollouts(trainer, 1, "eager")
    time.sleep(0.3)  # the producer has filled the queue and waits for weights
    tick = time.perf_counter()
    rollouts.stop()
    assert time.perf_counter() - tick < 1.0 and not rollouts.thread.is_alive()


def test_a_failing_producer_stops_the_learner():
    trainer = FakeTrainer(total_steps=3)

    def broken(*args, **kwargs):
        raise ValueError("verifier down")

    trainer.collect_batch = broken
    with pytest.raises(RuntimeError, match="rollout producer failed.*verifier down"):
        _train(trainer, 1, 1)


# ---------------------------------------------------------------------- scripts/async_timeline.py
def _timeline_script():
    return load_script("async_timeline")


def test_timeline_phases_put_both_threads_on_one_axis(tmp_path):
    timeline = _timeline_script()
    step = {"time/step": 3.0, "time/generate": 1.0, "time/reward": 0.5, "time/train": 1.0, "time/weight_push": 0.25}
    sync = [{"step": 1, **step}, {"step": 2, **step}]
    assert timeline.phases(sync) == {"loop": [(1, "collect", 0.0, 1.5), (1, "train", 1.5, 1.0), (1, "push", 2.5, 0.25),
                                              (2, "collect", 3.0, 1.5), (2, "train", 4.5, 1.0), (2, "push", 5.5, 0.25)]}
    one = {"step": 1, **step, "time/produce_begin": 0.0, "time/produce_end": 1.5, "time/train_begin": 1.5,
           "time/learner_wait_push": 0.5, "async/staleness_max": 0, "async/queue_depth": 0,
           "time/learner_wait_data": 1.5, "time/producer_wait_weights": 0.0}
    assert timeline.phases([one]) == {"producer": [(1, "collect", 0.0, 1.5)],
                                      "learner": [(1, "train", 1.5, 1.0), (1, "push", 3.0, 0.25)]}
    for name, rows in (("sync", sync), ("async", [one])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in rows))
    timeline.main([str(tmp_path / "sync"), str(tmp_path / "async")], str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------- validation
def _cfg(tiny_model_dir, *overrides):
    return compose([f"model.path={tiny_model_dir}", "rollout=vllm_server", "rollout.engine.options.urls=[http://x:1]",
                    "trainer.max_staleness=1", *overrides])


def test_async_refusals_name_the_key(tiny_model_dir):
    validate(_cfg(tiny_model_dir))
    with pytest.raises(ConfigError, match=r"^trainer.max_staleness: algorithm.advantage=opo needs exactly on-policy"):
        validate(_cfg(tiny_model_dir, "+recipe=opo"))
    colocated = r"^trainer.max_staleness: rollout.engine=vllm generates.*rollout=vllm_server"
    with pytest.raises(ConfigError, match=colocated):
        validate(compose([f"model.path={tiny_model_dir}", "trainer.max_staleness=1"]))
    with pytest.raises(ConfigError, match=r"^algorithm.sampler.options.branch_score: fr3e's entropy"):
        validate(_cfg(tiny_model_dir, "+recipe=fr3e"))
    validate(_cfg(tiny_model_dir, "+recipe=fr3e", "algorithm.sampler.options.branch_score=surprisal"))
    with pytest.raises(ConfigError, match=r"^trainer.max_staleness: "):
        validate(_cfg(tiny_model_dir, "trainer.max_staleness=-1"))
    with pytest.raises(ConfigError, match=r"^trainer.async_schedule: unknown schedule 'lazy'.*Fix: use fixed"):
        validate(_cfg(tiny_model_dir, "trainer.async_schedule=lazy"))


# ---------------------------------------------------------------------- real runs on one shared server
def _served(server, *overrides):
    return [*COMMON, "rollout=vllm_server", f"rollout.engine.options.urls=[{server}]", *overrides]


@pytest.mark.slow
def test_k1_with_a_producer_slower_than_the_learner_trains_exactly_the_synchronous_run(
        running_server, tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    sync = run(tmp_path, tiny_model_dir, "sync", *_served(running_server))
    assert not any(key.startswith("async/") for key in sync[0])  # k = 0: the synchronous loop

    def wait_for_the_learner(self, index):
        with self.changed:
            self.changed.wait_for(lambda: self.finished >= index or self.stopping.is_set())

    monkeypatch.setattr(AsyncRollouts, "before_batch", wait_for_the_learner)
    slow = run(tmp_path, tiny_model_dir, "async_slow_producer",
               *_served(running_server, "trainer.max_staleness=1", "trainer.async_schedule=eager"))
    assert [m["async/staleness_max"] for m in slow] == [0.0, 0.0, 0.0]
    for a, b in zip(sync, slow):
        assert a["reward/mean"] == b["reward/mean"] and a["response/tokens"] == b["response/tokens"]
        assert b["rollout/logprob_gap_max"] < 1e-4
    w_sync, w_async = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("sync", "async_slow_producer"))
    assert all(torch.equal(w_sync[k], w_async[k]) for k in w_sync)


@pytest.mark.slow
def test_k1_with_a_slow_learner_trains_samples_one_version_old(running_server, tmp_path, tiny_model_dir,
                                                               monkeypatch):  # noqa: F811
    train_on = Trainer.train_on
    trained = []

    def slow_train_on(self, collected, start, produced=None):
        trained.append((self.learner.version, collected.batch.policy_version.tolist()))
        time.sleep(2.0)  # the producer finishes its next batch long before
        return train_on(self, collected, start, produced)

    monkeypatch.setattr(Trainer, "train_on", slow_train_on)
    metrics = run(tmp_path, tiny_model_dir, "async_slow_learner",
                  *_served(running_server, "trainer.max_staleness=1", "trainer.total_steps=4"))
    for version, sample_versions in trained:  # every trained sample within k of the learner
        assert sample_versions and min(sample_versions) >= version - 1
    assert [m["async/staleness_max"] for m in metrics] == [0.0, 1.0, 1.0, 1.0]
    assert all(m["async/queue_depth"] <= 1 and m["async/dropped_stale"] == 0 for m in metrics)
    assert sum(m["time/producer_wait_weights"] for m in metrics) > 1.0  # waited for weights, did not draw ahead
    # the behaviour logprobs are the engine's (the older weights): the ratio and its clipping see the lag
    assert metrics[0]["rollout/logprob_gap_max"] < 1e-4 and metrics[0]["actor/clip_frac"] == 0
    assert all(m["rollout/logprob_gap_max"] > 1e-3 and m["actor/clip_frac"] > 0 for m in metrics[1:])
    # scripts/async_timeline.py's smoke test: this run's timeline, one row a step, the waits and staleness in it,
    # and its plot (a producer and a learner row)
    png = tmp_path / "timeline.png"
    timeline = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "scripts" / "async_timeline.py"),
                               str(tmp_path / "async_slow_learner"), "--plot", str(png)],
                              capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in timeline.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4] and [r[-2] for r in rows] == ["0", "1", "1", "1"]
    assert "mean time/step over steps 2..4" in timeline
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_fr3e_with_surprisal_runs_async(running_server, tmp_path, tiny_model_dir):  # noqa: F811
    metrics = run(tmp_path, tiny_model_dir, "fr3e_async", "+recipe=fr3e",
                  *_served(running_server, "trainer.max_staleness=1", "trainer.total_steps=2",
                           "algorithm.sampler.options.base_n=2",
                           "algorithm.sampler.options.k=1", "algorithm.max_sample_rounds=1",
                           "algorithm.sampler.options.branch_score=surprisal"))
    assert [m["step"] for m in metrics] == [1, 2] and all(m["batch/samples_trained"] > 0 for m in metrics)
    assert all(any(key.startswith("fr3e/") for key in m) for m in metrics)  # read in the producer, with its batch
    assert all(m["async/staleness_max"] <= 1 for m in metrics)


@pytest.mark.slow
def test_sigint_during_an_async_run_leaves_a_resumable_checkpoint_and_no_process(vllm_plugin_env, running_server,
                                                                                tmp_path, tiny_model_dir):  # noqa: F811
    port = free_port("127.0.0.1")
    name = "stopped_async"
    cmd = [sys.executable, "-m", "rlkit.train", f"model.path={tiny_model_dir}", f"logging.output_dir={tmp_path}",
           f"logging.run_name={name}", *TINY, "trainer.total_steps=1000", "trainer.export_final=false",
           "trainer.max_staleness=1", f"rollout.engine.options.port={port}", *COMMON[1:], *SERVER]
    trainer = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, pgid = tmp_path / name / "metrics.jsonl", None
    deadline = time.monotonic() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert trainer.poll() is None and time.monotonic() < deadline, trainer.stderr.read().decode()[-3000:]
        pgid = pgid or _server_group(port)
        time.sleep(0.2)
    assert pgid is not None
    trainer.send_signal(signal.SIGINT)
    _, err = trainer.communicate(timeout=180)
    assert trainer.returncode == 128 + signal.SIGINT, err.decode()[-3000:]
    assert b"stopped at step" in err, err.decode()[-2000:]
    assert not _group_alive(pgid)  # the launched server is gone with the run
    done = len(metrics.read_text().splitlines())
    state = json.loads((tmp_path / name / "checkpoints" / f"step_{done}" / "trainer_state.json").read_text())
    assert state["step"] == done and state["next_batch"] == done  # batches in flight were not counted as drawn
    resumed = run(tmp_path, tiny_model_dir, name, *_served(running_server, "trainer.max_staleness=1",
                                                           f"trainer.total_steps={done + 1}", "trainer.resume=auto",
                                                           "rollout.engine.options.launch=false"))
    assert [m["step"] for m in resumed][-1] == done + 1


def _final(tmp_path, name):
    return load_file(tmp_path / name / "final" / "model.safetensors")


@pytest.mark.slow
def test_fixed_k1_trains_the_same_weights_whatever_the_speeds(running_server, tmp_path, tiny_model_dir,
                                                              monkeypatch):  # noqa: F811
    fixed = _served(running_server, "trainer.max_staleness=1", "trainer.async_schedule=fixed")
    before_push = AsyncRollouts.before_push

    def push_when_collected(self):  # tells the producer that the learner has trained and waits to push
        with self.changed:
            self.at_push = self.training
            self.changed.notify_all()
        return before_push(self)

    def start_once_the_learner_waits(self, index):  # slower than the learner: batch i starts once it waits
        with self.changed:
            self.changed.wait_for(lambda: getattr(self, "at_push", -1) >= index - 1 or self.stopping.is_set(), 60)

    with monkeypatch.context() as patch:
        patch.setattr(AsyncRollouts, "before_push", push_when_collected)
        patch.setattr(AsyncRollouts, "before_batch", start_once_the_learner_waits)
        slow_producer = run(tmp_path, tiny_model_dir, "slow_producer", *fixed)
    train_on = Trainer.train_on

    def slow_train_on(self, collected, start, produced=None):  # the learner slower: the producer waits for weights
        time.sleep(1.0)
        return train_on(self, collected, start, produced)

    monkeypatch.setattr(Trainer, "train_on", slow_train_on)
    slow_learner = run(tmp_path, tiny_model_dir, "slow_learner", *fixed)
    for metrics in (slow_producer, slow_learner):
        assert [(m["async/batch_index"], m["async/policy_version"]) for m in metrics] == [(0, 0), (1, 0), (2, 1)]
    # the timings differed: one learner waited to push for each next batch, the other's producer for weights
    assert all(m["time/learner_wait_push"] > 0.01 for m in slow_producer)
    assert sum(m["time/producer_wait_weights"] for m in slow_learner) > 0.3
    assert [m["reward/mean"] for m in slow_producer] == [m["reward/mean"] for m in slow_learner]
    a, b = _final(tmp_path, "slow_producer"), _final(tmp_path, "slow_learner")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fixed_k1_resumes_exactly(running_server, tmp_path, tiny_model_dir):  # noqa: F811
    fixed = _served(running_server, "trainer.max_staleness=1", "trainer.async_schedule=fixed")
    straight = run(tmp_path, tiny_model_dir, "straight", *fixed, "trainer.total_steps=4")
    run(tmp_path, tiny_model_dir, "parts", *fixed, "trainer.total_steps=2")
    held = torch.load(tmp_path / "parts" / "checkpoints" / "step_2" / "in_flight.pt", weights_only=False)
    assert [(item.index, item.version) for item in held["batches"]] == [(2, 1)]  # sampled before the last push
    run(tmp_path, tiny_model_dir, "parts", *fixed, "trainer.total_steps=4", "trainer.resume=auto")
    parts = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in parts] == [1, 2, 3, 4]
    assert [m["async/policy_version"] for m in parts] == [0, 0, 1, 2]
    assert [m["reward/mean"] for m in parts] == [m["reward/mean"] for m in straight]
    a, b = _final(tmp_path, "straight"), _final(tmp_path, "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)
