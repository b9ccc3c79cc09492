"""The server side of the `rlkit_shm` backend (`rlkit.rollout.shm_transfer`): runs inside vLLM's worker."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import WeightTransferUpdateInfo

from rlkit.rollout.inprocess_transfer import InProcessWeightTransferEngine
from rlkit.rollout.shm_transfer import views


@dataclass
class SharedMemoryUpdateInfo(WeightTransferUpdateInfo):
    """Where the trainer wrote the weights: the file, its size in bytes, each tensor's name/dtype/shape/offset."""

    path: str
    size: int
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    offsets: list[int]


class SharedMemoryWeightTransferEngine(InProcessWeightTransferEngine):
    """Maps the trainer's file and loads its tensors (load_weights copies them into the model's parameters)."""

    update_info_cls = SharedMemoryUpdateInfo

    def receive_weights(self, update_info: SharedMemoryUpdateInfo) -> None:
        buffer = torch.from_file(update_info.path, shared=True, size=update_info.size, dtype=torch.uint8)
        self.model.load_weights(weights=iter(views(buffer, vars(update_info))))
