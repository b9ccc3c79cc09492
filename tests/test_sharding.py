"""FSDP2 on CPU (gloo, torchrun): the sharded Learner's weights() are the unsharded model's state dict, one
update on two ranks trains what one unsharded process trains, and its checkpoint state round-trips; the launch
refusals (DeepSpeed, FSDP1, fp16 and plug-ins that read the LM head or optimizer state under FSDP2)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlkit.config import ConfigError, build_plugins, compose
from rlkit.validation import validate
from rlkit.registry import declare
from rlkit.trainer.learner import Learner
from rlkit.trainer.setup import make_accelerator
from sharded_worker import TOKEN_STATS_ROWS, learner_batch, learner_overrides

ROOT = Path(__file__).parent.parent
# What `accelerate launch` with fsdp2.yaml sets. Its default FSDP_CPU_RAM_EFFICIENT_LOADING=true makes transformers
# load the checkpoint on rank 0 only (zeros elsewhere): the shards must come from rank 0's weights.
FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
# Two optimizer steps at lr 1e-3 move the weights by 2.0e-3; sharded and unsharded differ only in the order fp32
# sums are taken (the gradient's reduce-scatter, the clipping norm over shards): measured max |dw| 7.3e-7 on two
# ranks, 2e-8 on one. The tolerance is test_distributed.py's.
ATOL = 1e-5


@declare(reads_optimizer_state=True)
def reads_moments(inputs):
    """A user token mask that would read the optimizer's moments (it keeps every token)."""
    return inputs.mask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(out: Path, model: Path, procs: int, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(_free_port()),
           str(Path(__file__).parent / "sharded_worker.py"), str(model), str(out), *overrides]
    env = {**os.environ, **FSDP2, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(ROOT)])}
    done = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=300)
    # both ends: a rank's own error comes first, torchrun's stopping of the other rank last
    assert done.returncode == 0, done.stderr if len(done.stderr) < 8000 else done.stderr[:4000] + "\n...\n" + done.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def unsharded(tiny_model_dir) -> dict[str, torch.Tensor]:
    """The weights one unsharded process trains from the worker's batch."""
    cfg = compose(learner_overrides(tiny_model_dir))
    learner = Learner(cfg, build_plugins(cfg), make_accelerator(cfg))
    learner.update(learner_batch(learner.pad_id))
    return dict(learner.weights())


@pytest.fixture(scope="module", params=[2, 1], ids=["2_ranks", "1_rank"])
def sharded(request, tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp(f"fsdp2_{request.param}")
    return out, _run_workers(out, tiny_model_dir, request.param)


@pytest.mark.slow
def test_weights_under_fsdp2_are_the_unsharded_state_dict(sharded, tiny_model_dir):
    out, result = sharded
    state = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert result["names"] == sorted(state)  # HF names, no wrapper prefix; the tied lm_head.weight included
    before = load_file(out / "before.safetensors")
    assert all(torch.equal(before[name], state[name]) for name in before)
    assert result["local_shard_rows"] == 256 // result["world_size"]  # each rank holds 1/N of a layer's rows


@pytest.mark.slow
def test_an_update_under_fsdp2_trains_what_one_unsharded_process_trains(sharded, unsharded):
    out, result = sharded
    after, moved = load_file(out / "after.safetensors"), 0.0
    for name, tensor in after.items():
        torch.testing.assert_close(tensor, unsharded[name], rtol=0, atol=ATOL)
        moved = max(moved, float((tensor - load_file(out / "before.safetensors")[name]).abs().max()))
    assert moved > 1e-4 and result["metrics"]["actor/grad_norm"] > 0.05  # it trained, and clipping acted


@pytest.mark.slow
def test_token_stats_under_fsdp2_pairs_up_ranks_that_score_different_rows(sharded, tiny_model_dir):
    """Rank 0 scores 1 row then none, rank 1 3 rows then 1 (micro-batches of one row): the logprobs one unsharded
    process computes (without the placeholder forwards, rank 1 would wait on a gather rank 0 never joins)."""
    out, result = sharded
    cfg = compose(learner_overrides(tiny_model_dir))
    learner = Learner(cfg, build_plugins(cfg), make_accelerator(cfg))
    batch = learner_batch(learner.pad_id)
    for rank in range(result["world_size"]):
        for rows, scored in zip(TOKEN_STATS_ROWS[rank], torch.load(out / f"token_stats_rank{rank}.pt")):
            assert scored.shape == (len(rows), batch.response_ids.shape[1])
            torch.testing.assert_close(scored, learner.token_stats(batch.select(rows)).logprobs, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_fsdp2_checkpoint_state_round_trips(sharded):
    _, result = sharded
    assert result["restored_weights"] and result["restored_moments"] and result["restored_version"] == 1


@pytest.mark.slow
def test_token_budget_and_padding_free_under_fsdp2_train_what_fixed_padded_micro_batches_train(tmp_path, tiny_model_dir):
    """One mini-batch of the worker's 4 rows (7, 5, 3 and 2 prompt+response tokens), 2 ranks: rank 0 holds 7 and 3,
    rank 1 holds 5 and 2; a budget of 8 tokens needs 2 micro-batches on rank 0 and 1 on rank 1, so rank 1 splits its
    one (every gathering forward and reduce-scattering backward must pair up). The weights one unsharded process
    trains with fixed, padded micro-batches."""
    cfg = compose([*learner_overrides(tiny_model_dir), "trainer.mini_batches=1"])
    learner = Learner(cfg, build_plugins(cfg), make_accelerator(cfg))
    learner.update(learner_batch(learner.pad_id))
    _run_workers(tmp_path, tiny_model_dir, 2, "trainer.mini_batches=1", "trainer.micro_batch_tokens=8",
                 "trainer.micro_batch_size=null", "trainer.padding_free=true")
    for name, tensor in load_file(tmp_path / "after.safetensors").items():
        torch.testing.assert_close(tensor, dict(learner.weights())[name], rtol=0, atol=ATOL)


def test_fsdp2_refuses_plugins_that_read_the_lm_head_or_the_optimizer_state(tiny_model_dir, monkeypatch):
    for key, value in FSDP2.items():
        monkeypatch.setenv(key, value)
    validate(compose([f"model.path={tiny_model_dir}"]))
    with pytest.raises(ConfigError, match=r"algorithm.token_mask: capo reads the LM head's weight \[V,d\], which FSDP2 "
                                          r"shards over the ranks \(each holds 1/1 of it\). Fix: train "
                                          r"algorithm.token_mask=capo without FSDP"):
        validate(compose([f"model.path={tiny_model_dir}", "+recipe=capo"]))
    monkeypatch.setenv("WORLD_SIZE", "2")  # FSDP2's reason comes first, before CAPO's single-process one
    with pytest.raises(ConfigError, match=r"capo reads the LM head's weight \[V,d\], which FSDP2 shards .* 1/2"):
        validate(compose([f"model.path={tiny_model_dir}", "+recipe=capo"]))
    with pytest.raises(ConfigError, match=r"test_sharding:reads_moments reads the optimizer's state, which FSDP2 shards"):
        validate(compose([f"model.path={tiny_model_dir}", "algorithm.token_mask=test_sharding:reads_moments"]))
    with pytest.raises(ConfigError, match=r"trainer.mixed_precision: fp16 needs accelerate's loss scaler"):
        validate(compose([f"model.path={tiny_model_dir}", "trainer.mixed_precision=fp16"]))


@pytest.mark.parametrize("env, refusal", [
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, r"accelerate launch config \(distributed_type: DEEPSPEED\): DeepSpeed ZeRO "
                                            r"reduces and partitions each gradient inside backward.* Fix: launch with "
                                            r"configs/accelerate/fsdp2.yaml"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, r"accelerate launch config \(fsdp_version\): fsdp1 is not "
                                                          r"supported.* Fix: set fsdp_version: 2"),
])
def test_deepspeed_and_fsdp1_are_refused_before_anything_loads(tiny_model_dir, monkeypatch, env, refusal):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=refusal):
        validate(compose([f"model.path={tiny_model_dir}"]))
