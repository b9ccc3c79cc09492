"""Two CPU processes (accelerate launch, gloo) train exactly what one process trains; rank 0 alone writes;
resume on two processes is exact; a refusal is printed once; a killed rank ends the job (docs/distributed.md).

The launches are slow (each starts vLLM in every process): the runs are shared by the tests of this module.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from rlkit.config import ConfigError, compose
from rlkit.validation import validate
from rlkit.registry import declare

ROOT = Path(__file__).parent.parent
LAUNCH_CONFIG = ROOT / "configs" / "accelerate" / "cpu_ddp_2.yaml"
# The GPU config as a user launches it, on 2 CPU processes: accelerate's FSDP environment (FSDP2, and its default
# rank-0-only checkpoint loading), gloo, fp32.
FSDP2_LAUNCH = ["--config_file", str(ROOT / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2",
                "--mixed_precision", "no"]
COMMON = ["rollout.n=4", "rollout.max_tokens=16", "rollout.engine.options.max_model_len=256",
          "trainer.prompts_per_step=4", "trainer.micro_batch_size=8", "trainer.micro_batch_tokens=null",
          "trainer.padding_free=false", "reward.num_workers=1", "data.limit=64",
          "logging.progress_bar=false", "reward.verifier=rl_tasks:contains_seven", "trainer.lr=1e-3",
          "trainer.warmup_steps=2", "trainer.save_every=0", "trainer.total_steps=4"]
# DAPO's resampling (zero_variance filter, several rounds) with GRPO-λ's top-λ ranking of the batch's groups.
GLOBAL_STATS = ["+recipe=dapo", "algorithm.reward_shaper=grpo_lambda"]
# Weights moved by ~2.5e-3 in 4 steps at lr 1e-3; one and two processes differ only in the order fp32 sums
# are taken (micro-batches per rank, then the all-reduce): measured 2.2e-7.
ATOL = 1e-5
# Except where Adam amplifies that order: it moves a weight by lr * m / (sqrt(v) + eps), about lr whatever the
# gradient's size, but less where |gradient| is near eps (1e-8), and there a 1e-9 change in the sum changes the move
# by up to ~10 % of lr. In CAPO's run (one step trains, then every token is rejected and Adam coasts on its moments)
# one weight in 32768 lands there: 1.2e-5 apart, moved 1.28e-4 against 1.07e-3 for the median weight. Such stray
# weights are counted, allowed up to STRAY_FRACTION of the elements, and bounded by STRAY_ATOL (a tenth of lr).
STRAY_FRACTION, STRAY_ATOL = 1e-4, 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, model: Path, name: str, *overrides: str, procs: int, wait: bool = True, fsdp: bool = False):
    """`python -m rlkit.train` in one process, or under `accelerate launch` with the 2-process CPU config (with
    `fsdp`: configs/accelerate/fsdp2.yaml on 2 processes)."""
    train = ["-m", "rlkit.train", f"model.path={model}", f"logging.output_dir={out}", f"logging.run_name={name}",
             *COMMON, *overrides]
    config = FSDP2_LAUNCH if fsdp else ["--config_file", str(LAUNCH_CONFIG)]
    cmd = [sys.executable, *train] if procs == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", *config, "--main_process_port", str(_free_port()), *train]
    paths = [str(Path(__file__).parent), str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    process = subprocess.Popen(cmd, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return process
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-4000:]
    return stderr


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_training(one: Path, two: Path, *, strays: bool = False) -> None:
    """Same final weights (within ATOL; with `strays`, up to STRAY_FRACTION of them within STRAY_ATOL) and metrics."""
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    apart = {key: (b[key] - a[key]).abs() for key in a}
    stray = sum(int((d > ATOL).sum()) for d in apart.values())
    assert stray <= (STRAY_FRACTION * sum(d.numel() for d in apart.values()) if strays else 0), stray
    assert max(float(d.max()) for d in apart.values()) <= (STRAY_ATOL if strays else ATOL)
    same = ("reward/mean", "reward/fresh_mean", "reward/trained_mean", "batch/samples_trained", "batch/sample_rounds",
            "rollout/generated_tokens", "actor/lr")
    close = ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "rollout/logprob_gap_mean")
    for m1, m2 in zip(_metrics(one), _metrics(two), strict=True):
        assert {k: m1[k] for k in same} == {k: m2[k] for k in same}
        for key in close:
            assert m2[key] == pytest.approx(m1[key], abs=1e-5), key


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("distributed")
    for name, overrides in (("grpo", []), ("global", GLOBAL_STATS), ("capo", ["+recipe=capo"])):
        for procs in (1, 2):
            launch(out, tiny_model_dir, f"{name}_{procs}", *overrides, procs=procs)
    launch(out, tiny_model_dir, "grpo_fsdp2", procs=2, fsdp=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["grpo", "global", "capo"])
def test_two_processes_train_the_weights_of_one(runs, name):
    _assert_same_training(runs / f"{name}_1", runs / f"{name}_2", strays=name == "capo")
    if name == "capo":  # the direction model judged every rank's tokens alike and summed them
        for m1, m2 in zip(_metrics(runs / "capo_1"), _metrics(runs / "capo_2"), strict=True):
            assert [m2[k] for k in m1 if k.startswith("capo/")] == pytest.approx([m1[k] for k in m1 if k.startswith("capo/")])
        return
    # actor/lr is the rate each update trained at: linear warmup over 2 steps from 0, then lr 1e-3
    assert [m["actor/lr"] for m in _metrics(runs / f"{name}_1")] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])
    rounds = [m["batch/sample_rounds"] for m in _metrics(runs / f"{name}_2")]
    if name == "global":
        assert max(rounds) > 1  # resampling happened, and ended at the same round on both ranks


@pytest.mark.slow
def test_a_whole_fsdp2_run_trains_the_weights_of_one_process(runs):
    """accelerate launch with fsdp2.yaml: sharded Learner, a colocated engine per rank fed by weights() gathered
    one tensor at a time, rank 0's checkpoint and export."""
    _assert_same_training(runs / "grpo_1", runs / "grpo_fsdp2")
    assert all(m["rollout/logprob_gap_max"] < 1e-4 for m in _metrics(runs / "grpo_fsdp2"))  # every push was taken


@pytest.mark.slow
def test_two_processes_with_token_budget_and_padding_free_train_the_weights_of_one(runs, tiny_model_dir):
    """trainer.micro_batch_tokens (ranks may need different numbers of micro-batches: each runs the most any rank
    needs) and trainer.padding_free on two processes, with CAPO's per-micro-batch collectives: the weights of one
    process with fixed, padded micro-batches."""
    launch(runs, tiny_model_dir, "capo_levers_2", "+recipe=capo", "trainer.micro_batch_tokens=120",
           "trainer.micro_batch_size=null", "trainer.padding_free=true", procs=2)
    _assert_same_training(runs / "capo_1", runs / "capo_levers_2", strays=True)


@pytest.mark.slow
def test_only_rank_0_writes_the_run_directory(runs):
    one, two = runs / "grpo_1", runs / "grpo_2"
    assert sorted(p.relative_to(two).as_posix() for p in two.rglob("*")) == \
        sorted(p.relative_to(one).as_posix() for p in one.rglob("*"))
    assert len(_metrics(two)) == 4  # every rank's samples, gathered in rank order: what one process samples
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()


@pytest.mark.slow
def test_resume_on_two_processes_is_exact(runs, tiny_model_dir):
    launch(runs, tiny_model_dir, "resumed", "trainer.total_steps=2", procs=2)
    launch(runs, tiny_model_dir, "resumed", "trainer.total_steps=4", "trainer.resume=auto", procs=2)
    _assert_same_training(runs / "grpo_2", runs / "resumed")
    state = json.loads((runs / "resumed" / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


@pytest.mark.slow
def test_reused_run_name_is_refused_once_and_resume_needs_the_same_process_count(runs, tiny_model_dir):
    process = launch(runs, tiny_model_dir, "grpo_2", procs=2, wait=False)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert stderr.count("rlkit: bad config: logging.run_name:") == 1, stderr[-3000:]
    process = launch(runs, tiny_model_dir, "grpo_2", "trainer.resume=auto", "trainer.total_steps=5", procs=1,
                     wait=False)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2
    assert "was saved by 2 process(es) and this job has 1" in stderr and "--num_processes 2" in stderr


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_naming_it(tmp_path, tiny_model_dir):
    process = launch(tmp_path, tiny_model_dir, "killed", "trainer.total_steps=1000", "trainer.collective_timeout_s=30",
                     procs=2, wait=False)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.5)
    family = psutil.Process(process.pid).children(recursive=True)
    rank1 = next(p for p in family if p.environ().get("RANK") == "1" and "rlkit.train" in " ".join(p.cmdline()))
    killed_at = time.monotonic()
    rank1.kill()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and time.monotonic() - killed_at < 60
    assert "rank      : 1" in stderr or "rank 1" in stderr, stderr[-3000:]
    time.sleep(2)
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# The recipes the runs above do not train (grpo; dapo with grpo_lambda's shaper), 2 steps each on 2 processes;
# capo is refused on several processes (below). FR3E smaller: 2 base responses, one branch point.
OTHER_RECIPES = {"dr_grpo": [], "opo": [], "grpo_lambda": [], "critique_grpo": ["rollout.engine.options.max_model_len=1024"],
                 "fr3e": ["algorithm.sampler.options.base_n=2", "algorithm.sampler.options.k=1",
                          "algorithm.max_sample_rounds=1"]}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(OTHER_RECIPES))
def test_every_recipe_runs_two_steps_on_two_processes(tmp_path, tiny_model_dir, recipe):
    launch(tmp_path, tiny_model_dir, recipe, f"+recipe={recipe}", "trainer.total_steps=2", *OTHER_RECIPES[recipe],
           procs=2)
    metrics = _metrics(tmp_path / recipe)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["rollout/logprob_gap_max"] < 1e-4 and m["batch/samples_trained"] > 0
        assert 0 <= m["reward/fresh_mean"] <= 1 and "actor/grad_norm" in m
    assert (tmp_path / recipe / "final" / "model.safetensors").is_file()


def test_prompts_must_split_over_the_processes_and_single_process_plugins_are_refused(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match=r"trainer.prompts_per_step: the step's 8 prompts must split evenly over the "
                                          r"job's 3 processes .* Fix: set trainer.prompts_per_step to a multiple of 3"):
        validate(compose([f"model.path={tiny_model_dir}"]))
    monkeypatch.setenv("WORLD_SIZE", "2")
    validate(compose([f"model.path={tiny_model_dir}"]))
    validate(compose([f"model.path={tiny_model_dir}", "+recipe=capo"]))  # its direction model sums every rank's tokens
    with pytest.raises(ConfigError, match=r"algorithm.token_mask: test_distributed:per_rank_mask keeps state updated "
                                          r"from one process's tokens"):
        validate(compose([f"model.path={tiny_model_dir}", "algorithm.token_mask=test_distributed:per_rank_mask"]))


@declare(single_process=True)
def per_rank_mask(inputs):
    """A user token mask whose state would be updated from one rank's tokens (it keeps every token)."""
    return inputs.mask
