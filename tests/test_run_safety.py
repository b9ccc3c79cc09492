"""Lose nothing (issue 12): a run's history is never overwritten by accident, a resume continues from the run's
own config, an interrupt leaves a checkpoint and the command that resumes, unfinished saves are cleaned up."""
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlkit.config import ConfigError, compose, default_config
from rlkit.trainer.run_dir import check_run_dir, continue_from_saved
from rlkit.trainer.trainer import Trainer
from rlkit.validation import validate
from test_trainer_e2e import TINY, run

TESTS = Path(__file__).parent


def _fake_run(run_dir: Path, cfg, steps: int) -> None:
    """What a run of `steps` steps leaves: its config, metrics lines and a checkpoint (state file only)."""
    (run_dir / "checkpoints" / f"step_{steps}").mkdir(parents=True)
    (run_dir / "checkpoints" / f"step_{steps}" / "trainer_state.json").write_text(json.dumps({"step": steps}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, steps + 1)))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def _cfg(tmp_path, tiny_model_dir, *overrides):
    return compose([f"model.path={tiny_model_dir}", f"logging.output_dir={tmp_path}", "logging.run_name=x", *TINY,
                    *overrides])


def test_reused_run_name_is_refused_before_anything_loads(tmp_path, tiny_model_dir):
    _fake_run(tmp_path / "x", _cfg(tmp_path, tiny_model_dir), steps=3)
    # A data source that does not exist: had the data loaded first, this would be a DataError.
    cfg = _cfg(tmp_path, tiny_model_dir, "data=file", f"data.source={tmp_path / 'missing.jsonl'}")
    with pytest.raises(ConfigError, match=r"logging.run_name: .* already holds a run \(3 logged steps, 1 checkpoints\)"
                                          r".*trainer.resume=auto.*fresh logging.run_name.*logging.overwrite=true"):
        Trainer(cfg)
    assert len((tmp_path / "x" / "metrics.jsonl").read_text().splitlines()) == 3


def test_overwrite_removes_the_earlier_run_and_resume_needs_a_checkpoint(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    _fake_run(tmp_path / "x", cfg, steps=3)
    check_run_dir(_cfg(tmp_path, tiny_model_dir, "logging.overwrite=true"))
    assert not (tmp_path / "x" / "metrics.jsonl").exists() and not (tmp_path / "x" / "checkpoints").exists()
    (tmp_path / "x" / "metrics.jsonl").write_text('{"step": 1}\n')  # a run that died before its first checkpoint
    with pytest.raises(ConfigError, match=r"trainer.resume: .* 1 logged steps but no checkpoint"):
        check_run_dir(_cfg(tmp_path, tiny_model_dir, "trainer.resume=auto"))


def test_stale_temp_checkpoints_are_removed_at_start(tmp_path, tiny_model_dir):
    stale = tmp_path / "x" / "checkpoints" / ".step_5.k2j3h4"  # a save killed half-way
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "model.safetensors").write_bytes(b"\0" * 1024)
    check_run_dir(_cfg(tmp_path, tiny_model_dir))
    assert not stale.exists()


def test_resume_takes_the_saved_config_as_base(tmp_path, tiny_model_dir, caplog):
    _fake_run(tmp_path / "x", _cfg(tmp_path, tiny_model_dir, "trainer.save_every=4", "trainer.keep_last=1",
                                   "+algorithm.advantage.options.eps=0.001"), steps=4)
    overrides = [f"logging.output_dir={tmp_path}", "logging.run_name=x", "trainer.resume=auto",
                 "trainer.total_steps=9"]
    cfg = continue_from_saved(compose(overrides), default_config(), overrides)
    assert (cfg.trainer.save_every, cfg.trainer.keep_last, cfg.trainer.total_steps) == (4, 1, 9)
    assert cfg.model.path == str(tiny_model_dir) and cfg.rollout.n == 4 and cfg.trainer.resume == "auto"
    assert cfg.algorithm.advantage.options.eps == 0.001  # a key added at the start is kept
    with caplog.at_level(logging.INFO, logger="rlkit"):
        check_run_dir(cfg)
    assert "resume: trainer.total_steps: 40 -> 9" in caplog.text


def test_resume_drops_a_retired_key_from_the_saved_config(tmp_path, tiny_model_dir, caplog):
    _fake_run(tmp_path / "x", _cfg(tmp_path, tiny_model_dir), steps=2)
    saved = tmp_path / "x" / "config.yaml"
    tree = OmegaConf.load(saved)
    tree.rollout.engine.options.cpu_threads = None  # what runs saved before the key was retired hold
    saved.write_text(OmegaConf.to_yaml(tree))
    overrides = [f"logging.output_dir={tmp_path}", "logging.run_name=x", "trainer.resume=auto"]
    with caplog.at_level(logging.WARNING, logger="rlkit"):
        cfg = continue_from_saved(compose(overrides), default_config(), overrides)
    assert "cpu_threads" not in cfg.rollout.engine.options and cfg.rollout.n == 4
    assert "rollout.engine.options.cpu_threads" in caplog.text and "no longer read" in caplog.text
    validate(cfg)


@pytest.mark.parametrize("override, key, reason", [
    ("rollout.n=8", "rollout.n", "batch shape"),  # 8 is the default: named on the command line, so it counts
    ("seed=1", "seed", "seeds data order"),
    ("data=gsm8k", "data.source", "data position"),
    ("+recipe=dapo", "algorithm.", "method is fixed"),
])
def test_resume_refuses_settings_a_checkpoint_cannot_follow(tmp_path, tiny_model_dir, override, key, reason):
    _fake_run(tmp_path / "x", _cfg(tmp_path, tiny_model_dir), steps=2)
    overrides = [f"logging.output_dir={tmp_path}", "logging.run_name=x", "trainer.resume=auto", override]
    cfg = continue_from_saved(compose(overrides), default_config(), overrides)
    with pytest.raises(ConfigError, match=rf"{key}.*: cannot change when resuming .*{reason}.* Fix: drop"):
        check_run_dir(cfg)


def test_cli_resume_refusal_is_one_line(tmp_path, tiny_model_dir):
    _fake_run(tmp_path / "x", _cfg(tmp_path, tiny_model_dir), steps=2)
    result = subprocess.run([sys.executable, "-m", "rlkit.train", f"logging.output_dir={tmp_path}",
                             "logging.run_name=x", "trainer.resume=auto", "rollout.n=8"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("rlkit: bad config: rollout.n: cannot change when "
                                                             "resuming"), result.stderr


def test_first_signal_stops_after_the_step_with_a_checkpoint(tmp_path, tiny_model_dir, monkeypatch, capsys):
    step = Trainer.train_step

    def interrupted_after_first(self):
        metrics = step(self)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would, mid-run
        return metrics

    monkeypatch.setattr(Trainer, "train_step", interrupted_after_first)
    common = ["trainer.total_steps=3", "reward.verifier=rl_tasks:contains_seven"]
    before = signal.getsignal(signal.SIGINT)  # Python's default, unless a library an earlier test loaded changed it
    first = run(tmp_path, tiny_model_dir, "x", *common)
    assert [m["step"] for m in first] == [1]
    assert (tmp_path / "x" / "checkpoints" / "step_1").is_dir() and not (tmp_path / "x" / "final").exists()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (f"rlkit: stopped at step 1/3, checkpoint {tmp_path / 'x' / 'checkpoints' / 'step_1'}. Resume: "
                    f"python -m rlkit.train logging.output_dir={tmp_path} logging.run_name=x trainer.resume=auto")
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    monkeypatch.setattr(Trainer, "train_step", step)
    resumed = run(tmp_path, tiny_model_dir, "x", *common, "trainer.resume=auto")
    assert [m["step"] for m in resumed] == [1, 2, 3] and (tmp_path / "x" / "final").is_dir()


def test_second_signal_exits_at_once():
    code = ("import os, signal, time\nfrom rlkit.trainer.interrupt import StopRequest\nwith StopRequest() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    assert stop.requested\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(60)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 128 + signal.SIGINT
    assert result.stderr.splitlines() == [
        "rlkit: SIGTERM: stopping after the current step and saving a checkpoint (press Ctrl-C again to exit at once)",
        "rlkit: SIGINT again: exiting now, without a checkpoint for the current step"]


def test_checkpoint_without_optimizer_state_loads_with_a_warning(tmp_path, tiny_model_dir, caplog):
    import torch

    from rlkit.config import build_plugins, compose
    from rlkit.trainer.checkpoint import load_checkpoint, save_checkpoint
    from rlkit.trainer.learner import Learner
    from rlkit.trainer.setup import make_accelerator

    def learner():
        cfg = compose([f"model.path={tiny_model_dir}", "trainer.lr=1e-3"])
        return Learner(cfg, build_plugins(cfg), make_accelerator(cfg))

    trained = learner()
    model = trained.model
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    trained.optimizer.step()
    trained.version = 1
    path = save_checkpoint(tmp_path, 1, learner=trained, save_optimizer=False, state={}, plugin_state={}, keep_last=1)
    assert (path / "optim.pt").stat().st_size < (path / "model" / "model.safetensors").stat().st_size / 10
    fresh = learner()
    with caplog.at_level(logging.WARNING, logger="rlkit"):
        load_checkpoint(path, learner=fresh)
    assert "holds no optimizer state (trainer.save_optimizer=false): AdamW's moments restart" in caplog.text
    assert not fresh.optimizer.state and torch.equal(fresh.model.lm_head.weight, model.lm_head.weight)
    assert fresh.version == 1


def test_run_without_optimizer_state_or_final_export(tmp_path, tiny_model_dir):
    run(tmp_path, tiny_model_dir, "x", "trainer.total_steps=1", "reward.verifier=rl_tasks:contains_seven",
        "trainer.save_optimizer=false", "trainer.export_final=false")
    checkpoint = tmp_path / "x" / "checkpoints" / "step_1"
    model_bytes = (checkpoint / "model" / "model.safetensors").stat().st_size
    assert (checkpoint / "optim.pt").stat().st_size < model_bytes / 10  # AdamW state would be 2x the model
    assert not (tmp_path / "x" / "final").exists()


@pytest.mark.slow
def test_cli_ctrl_c_saves_and_the_cli_resumes_from_the_saved_config(tmp_path, tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    where = [f"logging.output_dir={tmp_path}", "logging.run_name=x"]
    start = subprocess.Popen(
        [sys.executable, "-m", "rlkit.train", f"model.path={tiny_model_dir}", *where, *TINY, "trainer.total_steps=50",
         "trainer.save_every=20", "trainer.keep_last=1", "reward.verifier=rl_tasks:contains_seven"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    for line in start.stdout:
        if line.startswith("step 1 "):
            os.killpg(start.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, reward workers included
            break
    _, err = start.communicate(timeout=300)
    assert start.returncode == 130 and "Traceback" not in err, err
    assert "trainer.resume=auto" in err.strip().splitlines()[-1]
    stopped_at = len((tmp_path / "x" / "metrics.jsonl").read_text().splitlines())
    assert (tmp_path / "x" / "checkpoints" / f"step_{stopped_at}").is_dir()
    # Only the run's name and one change: model, TINY settings and keep_last come from its config.yaml.
    resumed = subprocess.run([sys.executable, "-m", "rlkit.train", *where, "trainer.resume=auto",
                              f"trainer.total_steps={stopped_at + 1}"], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resume: trainer.total_steps: 50 -> {stopped_at + 1}" in resumed.stdout + resumed.stderr
    saved = OmegaConf.load(tmp_path / "x" / "config.yaml")
    assert (saved.trainer.keep_last, saved.rollout.n, saved.model.path) == (1, 4, str(tiny_model_dir))
    steps = [json.loads(line)["step"] for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stopped_at + 2))
