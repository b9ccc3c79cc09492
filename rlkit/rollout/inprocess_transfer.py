"""A vLLM weight-transfer backend for a trainer that shares the engine's process.

vLLM's RL API (`LLM.start_weight_update / update_weights / finish_weight_update`)
dispatches to a `WeightTransferEngine` chosen by name. Its built-in backends move
tensors across processes (CUDA IPC, NCCL). When the engine runs inside the
trainer's process (CPU, or a colocated single GPU) the tensors can be handed over
by reference: this backend does that, inside vLLM's layerwise-reload protocol so
fused/tied parameters are rebuilt the way vLLM's own loaders build them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
from vllm.model_executor.model_loader.reload import (
    finalize_layerwise_reload,
    initialize_layerwise_reload,
)

BACKEND_NAME = "rlkit_inprocess"


@dataclass
class InProcessInitInfo(WeightTransferInitInfo):
    """Nothing to rendezvous: trainer and engine share an address space."""


@dataclass
class InProcessUpdateInfo(WeightTransferUpdateInfo):
    """weights: HF-named tensors, passed by reference."""

    weights: list[tuple[str, torch.Tensor]]


class InProcessWeightTransferEngine(WeightTransferEngine[InProcessInitInfo, InProcessUpdateInfo]):
    init_info_cls = InProcessInitInfo
    update_info_cls = InProcessUpdateInfo

    def init_transfer_engine(self, init_info: InProcessInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class also synchronises an accelerator, which a CPU worker has not.
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def receive_weights(self, update_info: InProcessUpdateInfo) -> None:
        self.model.load_weights(weights=iter(update_info.weights))

    def finish_weight_update(self) -> None:
        finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        pass


def register() -> str:
    """Register the backend with vLLM once per process; returns its name."""
    if BACKEND_NAME not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND_NAME, InProcessWeightTransferEngine)
    return BACKEND_NAME
