"""This process's place among the training ranks, and the few collectives a step needs (docs/distributed.md).

A step is spread over ranks by prompts: each rank samples and scores its share of the step's prompts, then
every rank gathers the whole batch, so filters, shapers and estimators see the global batch and decide the
same on every rank. One process (world size 1) needs no process group and every collective is the identity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlkit.batch import RolloutBatch

# Group ids of rank r start at first_group_id + r * GROUP_ID_STRIDE, so ids made on different ranks never
# collide (no sampler makes 2**32 groups in one round).
GROUP_ID_STRIDE = 2**32


@dataclass(frozen=True)
class Ranks:
    """rank in [0, world_size); `current()` reads the initialised process group (accelerate's)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> slice:
        """This rank's contiguous share of `count` items (count divisible by world_size, checked at validation)."""
        if count % self.world_size:
            raise ValueError(f"{count} items do not split evenly over {self.world_size} ranks")
        size = count // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def first_group_id(self, first: int) -> int:
        """Where this rank numbers its groups from, for ids unique over every rank."""
        return first + self.rank * GROUP_ID_STRIDE

    def gather(self, obj: object) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_batch(self, batch: RolloutBatch, pad_id: int) -> RolloutBatch:
        """Every rank's batch joined in rank order (the order one process would have sampled them in)."""
        return batch if self.world_size == 1 else RolloutBatch.concat(self.gather(batch), pad_id)

    def sum(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX)

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _reduce(self, value: float, op) -> float:
        if self.world_size == 1:
            return float(value)
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=op)
        return float(tensor.item())
