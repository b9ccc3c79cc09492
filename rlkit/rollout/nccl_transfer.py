"""Weight push to a vLLM server over NCCL (GPU): vLLM's own trainer-side engine, driven through rlkit's HTTP client.

`NCCLTrainerWeightTransferEngine` (vllm.distributed.weight_transfer.nccl_engine) opens an NCCL group in which
this trainer process is rank 0 and the server's workers follow, then per push tells the workers the names,
dtypes and shapes over `/update_weights` while it broadcasts the tensors. rlkit supplies the two pieces that
engine asks for: a client over the server's RL routes (rlkit's retries and errors, and the weight version on
`/finish_weight_update`) and the source of the push's tensors. One group per server.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch

from rlkit.rollout.server_http import ServerClient
from rlkit.rollout.server_launch import free_port

BACKEND_NAME = "nccl"


class RouteClient:
    """vLLM's `VLLMWeightSyncClient` protocol over one server's RL routes; `version` goes out with the finish."""

    def __init__(self, client: ServerClient):
        self.client, self.version = client, None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.client.post("/init_weight_transfer_engine", json={"init_info": init_info}, retry=False)

    def start_weight_update(self) -> None:
        self.client.post("/start_weight_update", retry=False)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.client.post("/update_weights", json={"update_info": update_info}, retry=False)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.client.post("/finish_weight_update", json={"weight_version": weight_version or self.version},
                         retry=False)


class PushedWeights:
    """The tensors of one push, as vLLM's `WeightSource` reads them: `metadata()` then one pass of `(name,
    tensor)`. Set `tensors` before each send (the references the trainer already holds; no copy)."""

    def __init__(self):
        self.tensors: list[tuple[str, torch.Tensor]] = []

    def metadata(self) -> list:
        from vllm.distributed.weight_transfer.base import ParamMeta

        return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self.tensors]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors)


class NcclSender:
    """This process as rank 0 of an NCCL group with one server's workers (world: 1 + the server's world size).

    host: the address the server's workers reach this process at (its port is picked free here). Building it
    is a rendezvous: the server's `/init_weight_transfer_engine` and this process's endpoint open together."""

    def __init__(self, client: ServerClient, host: str):
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        self.route = RouteClient(client)
        self.weights = PushedWeights()
        world = 1 + int(client.get("/get_world_size", params={"include_dp": "false"})["world_size"])
        info = NCCLTrainerInitInfo(master_address=host, master_port=free_port(host), world_size=world, rank=0)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(info, client=self.route, source=self.weights)

    def send(self, tensors: list[tuple[str, torch.Tensor]], version: str) -> None:
        """start, update (the workers receive while this process broadcasts), finish with `version`."""
        self.weights.tensors, self.route.version = tensors, version
        try:
            self.engine.send_weights()
        finally:
            self.weights.tensors = []

    def close(self) -> None:
        self.engine.shutdown()


def nccl_tensors(named_tensors) -> list[tuple[str, torch.Tensor]]:
    """(name, contiguous CUDA tensor) of every weight, in order; NCCL sends from the tensor's device memory."""
    return [(name, t.detach().contiguous().to("cuda")) for name, t in named_tensors]
