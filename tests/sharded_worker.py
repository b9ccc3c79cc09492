"""One rank of tests/test_sharding.py's FSDP2 job (torchrun, gloo on CPU, FSDP2 asked for in the environment).

`python sharded_worker.py MODEL_DIR OUT_DIR [OVERRIDE ...]`: a sharded Learner trains `learner_batch()` once;
rank 0 writes its weights() before and after (before.safetensors, after.safetensors), the update's metrics and
the time one full gather of weights() takes (result.json), and whether a second sharded Learner restored from
its save_pretrained and state_dict() equals it (the checkpoint round trip). Before the update, each rank scores
a different number of rows with token_stats (TOKEN_STATS_ROWS; token_stats_rank{r}.pt): ranks whose
micro-batch counts differ must still pair up every parameter gather.
"""
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rlkit.batch import RolloutBatch
from rlkit.config import build_plugins, compose
from rlkit.trainer.learner import Learner
from rlkit.trainer.setup import make_accelerator

GATHERS = 20  # full passes over weights() timed
# Rows of learner_batch() each rank scores with token_stats, in two calls: 1 vs 3 micro-batches (rank 0's row
# has a one-token response, so no second token to run), then none vs 1.
TOKEN_STATS_ROWS = {0: ([3], []), 1: ([0, 1, 2], [0])}


def learner_overrides(model_dir) -> list[str]:
    """Two mini-batches (two optimizer steps, clipped) of micro-batches of one row, the prompt run once per
    micro-batch."""
    return [f"model.path={model_dir}", "trainer.lr=1e-3", "rollout.max_tokens=8", "trainer.mini_batches=2",
            "trainer.micro_batch_size=1", "trainer.micro_batch_tokens=null", "trainer.padding_free=false",
            "trainer.max_grad_norm=0.05", "trainer.shared_prompt_forward=true"]


def learner_batch(pad_id: int) -> RolloutBatch:
    """4 responses [4,4] of prompts of 1-3 tokens, with advantages."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, pad_id, pad_id], [11, 12, 13, pad_id], [14, pad_id, pad_id, pad_id]])
    mask = (ids != pad_id).float()
    batch = RolloutBatch(prompt_ids=[[1, 2, 3], [4], [2, 3], [1]], response_ids=ids, response_mask=mask,
                         behavior_logprobs=torch.full((4, 4), -7.0), group_ids=torch.tensor([0, 0, 1, 1]),
                         prompt_index=torch.tensor([0, 0, 1, 1]), truncated=torch.zeros(4, dtype=torch.bool),
                         rows=[{}] * 4, texts=[""] * 4)
    batch.advantages = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]]) * mask
    return batch


def main(model_dir: str, out: str, *overrides: str) -> None:
    out = Path(out)
    cfg = compose([*learner_overrides(model_dir), *overrides])
    learner = Learner(cfg, build_plugins(cfg), make_accelerator(cfg))
    assert learner.sharded and learner.world_size == dist.get_world_size()
    before = {name: tensor.clone() for name, tensor in learner.weights()}  # on one rank: views of the shards
    scored = [learner.token_stats(learner_batch(learner.pad_id).select(rows)).logprobs
              for rows in TOKEN_STATS_ROWS[learner.rank]]
    torch.save(scored, out / f"token_stats_rank{learner.rank}.pt")
    metrics = learner.update(learner_batch(learner.pad_id))
    after = dict(learner.weights())
    start = time.perf_counter()
    for _ in range(GATHERS):
        for _name, _tensor in learner.weights():
            pass
    gather_s = (time.perf_counter() - start) / GATHERS
    learner.save_pretrained(out / "model" if learner.is_main else None)
    state = learner.state_dict()
    if learner.is_main:
        torch.save(state, out / "optim.pt")
    dist.barrier()
    restored = Learner(cfg, build_plugins(cfg), make_accelerator(cfg))
    restored.load_weights(load_file(out / "model" / "model.safetensors"))
    restored.load_state_dict(torch.load(out / "optim.pt", weights_only=False))
    same_weights = all(torch.equal(after[name], tensor) for name, tensor in restored.weights())
    again = restored.state_dict()
    if learner.is_main:
        moments = [(s, again["optimizer"]["state"][name]) for name, s in state["optimizer"]["state"].items()]
        save_file({k: v.contiguous() for k, v in before.items() if k != "lm_head.weight"}, out / "before.safetensors")
        save_file({k: v.contiguous() for k, v in after.items() if k != "lm_head.weight"}, out / "after.safetensors")
        (out / "result.json").write_text(json.dumps({
            "metrics": metrics, "gather_s": gather_s, "world_size": learner.world_size,
            "names": sorted(before), "restored_weights": same_weights, "restored_version": restored.version,
            "restored_moments": bool(moments) and all(torch.equal(a["exp_avg"], b["exp_avg"])
                                                      and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"]) for a, b in moments),
            "local_shard_rows": restored.model.model.layers[0].mlp.up_proj.weight.to_local().shape[0]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
