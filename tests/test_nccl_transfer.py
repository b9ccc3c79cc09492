"""The GPU weight push over NCCL, checked without a GPU: the backend choice, the routes and version vLLM's
trainer-side NCCL engine is driven through, what it is told about the tensors, and the push's order on every
server (pause, send, resume). The NCCL broadcast itself needs CUDA and is not run here (docs/rollout_server.md)."""
import inspect

import pytest
import torch

from rlkit.rollout import server_engine
from rlkit.rollout.nccl_transfer import PushedWeights, RouteClient
from rlkit.rollout.server_engine import VLLMServerEngine, weight_backend_for


class RecordingClient:
    """A ServerClient that records what it is asked and answers like a fresh single-GPU server."""

    calls: list = []

    def __init__(self, url, **_):
        self.url, self.version = url, "default"

    def post(self, path, **kwargs):
        RecordingClient.calls.append((self.url, path, kwargs.get("json")))
        if path == "/finish_weight_update":
            self.version = kwargs["json"]["weight_version"]
        return {}

    def get(self, path, **_):
        return {"weight_version": self.version} if path == "/weight_info" else {"world_size": 1}

    def close(self):
        pass


def test_weight_backend_follows_the_device_and_refuses_nccl_without_cuda():
    assert weight_backend_for("auto", cuda=False) == "rlkit_shm"
    assert weight_backend_for("auto", cuda=True) == "nccl"
    assert weight_backend_for("rlkit_shm", cuda=True) == "rlkit_shm"
    with pytest.raises(ValueError, match="nccl needs CUDA.*Fix: weight_backend=rlkit_shm"):
        weight_backend_for("nccl", cuda=False)
    with pytest.raises(ValueError, match="'gloo' is not a backend. Fix: one of auto, rlkit_shm, nccl"):
        weight_backend_for("gloo", cuda=False)


def test_route_client_drives_the_rl_routes_and_sends_the_version():
    RecordingClient.calls = []
    route = RouteClient(RecordingClient("http://s"))
    route.version = "run:3"
    route.init_weight_transfer_engine({"master_port": 1})
    route.start_weight_update()
    route.update_weights({"names": ["w"]})
    route.finish_weight_update()
    assert RecordingClient.calls == [
        ("http://s", "/init_weight_transfer_engine", {"init_info": {"master_port": 1}}),
        ("http://s", "/start_weight_update", None),
        ("http://s", "/update_weights", {"update_info": {"names": ["w"]}}),
        ("http://s", "/finish_weight_update", {"weight_version": "run:3"})]


def test_pushed_weights_declare_what_they_yield():
    weights = PushedWeights()
    weights.tensors = [("a.weight", torch.zeros(2, 3)), ("b.bias", torch.zeros(4, dtype=torch.bfloat16))]
    meta = weights.metadata()
    assert [(m.name, m.dtype, m.shape) for m in meta] == [("a.weight", torch.float32, (2, 3)),
                                                         ("b.bias", torch.bfloat16, (4,))]
    assert [name for name, _ in weights] == ["a.weight", "b.bias"]


def test_vllms_nccl_trainer_engine_takes_what_rlkit_passes():
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

    info = NCCLTrainerInitInfo(master_address="127.0.0.1", master_port=1, world_size=2, rank=0)
    assert info.is_sender and info.packed
    assert {"client", "source"} <= set(inspect.signature(NCCLTrainerWeightTransferEngine.trainer_init).parameters)
    assert callable(NCCLTrainerWeightTransferEngine.send_weights)


def test_an_nccl_push_pauses_sends_and_resumes_every_server_with_the_version(monkeypatch):
    sent = []

    class StubSender:
        def __init__(self, client, host):
            self.client, self.host = client, host

        def send(self, tensors, version):
            sent.append((self.client.url, [name for name, _ in tensors], version))
            self.client.version = version  # as the real finish_weight_update does

        def close(self):
            pass

    RecordingClient.calls = []
    monkeypatch.setattr(server_engine, "ServerClient", RecordingClient)
    monkeypatch.setattr(server_engine, "NcclSender", StubSender)
    monkeypatch.setattr(server_engine, "nccl_tensors", list)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    engine = VLLMServerEngine("/m", urls=["http://a", "http://b"], weight_backend="auto", nccl_host="10.0.0.1")
    assert engine.backend == "nccl" and [s.host for s in engine._senders] == ["10.0.0.1", "10.0.0.1"]
    engine.update_weights([("w", torch.ones(2))])
    version = engine.expected_version
    assert sent == [("http://a", ["w"], version), ("http://b", ["w"], version)]
    assert [(url, path) for url, path, _ in RecordingClient.calls] == [
        ("http://a", "/pause"), ("http://a", "/resume"), ("http://b", "/pause"), ("http://b", "/resume")]
    engine.close()
