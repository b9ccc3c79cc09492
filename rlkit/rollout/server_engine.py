"""Rollouts on separate `vllm serve` processes (docs/rollout_server.md).

Generation goes through each server's completions API (token-id prompts, one request per prompt with its own
seed, logprobs of the sampled tokens); the step's prompts are spread over the servers in contiguous shares.
Weights go through vLLM's RL routes (`VLLM_SERVER_DEV_MODE=1`): pause, start, update, finish with a weight
version, resume, on every server; the version each server reports (`/weight_info`) is checked after every
push and around every generation, so a server that missed a push (or restarted) stops the run.

Over several trainer ranks every rank sends its own prompts; rank 0 alone launches a server, pushes the weights
and stops it, and tells the other ranks the servers' address, the run's version prefix and how each push went.
"""
from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch

from rlkit.ranks import Ranks
from rlkit.rollout.base import Completion, SamplingConfig
from rlkit.rollout.server_http import ServerClient, ServerError
from rlkit.rollout.server_launch import ServerProcess, free_port, serve_command, serve_env
from rlkit.rollout.nccl_transfer import BACKEND_NAME as NCCL_BACKEND
from rlkit.rollout.nccl_transfer import NcclSender, nccl_tensors
from rlkit.rollout.shm_transfer import BACKEND_NAME as SHM_BACKEND
from rlkit.rollout.shm_transfer import SharedMemoryWriter

INITIAL_VERSION = "default"  # what a fresh server reports before any push (vLLM 0.32)


def weight_backend_for(name: str, cuda: bool) -> str:
    """The weight backend `name` ("auto", "rlkit_shm", "nccl") stands for; ValueError naming the fix otherwise."""
    if name == "auto":
        return NCCL_BACKEND if cuda else SHM_BACKEND
    if name == NCCL_BACKEND and not cuda:
        raise ValueError("rollout.engine.options.weight_backend: nccl needs CUDA on the trainer, and this process has "
                         "none. Fix: weight_backend=rlkit_shm (or auto)")
    if name not in (NCCL_BACKEND, SHM_BACKEND):
        raise ValueError(f"rollout.engine.options.weight_backend: {name!r} is not a backend. Fix: one of auto, "
                         f"{SHM_BACKEND}, {NCCL_BACKEND}")
    return name


class VLLMServerEngine:
    """Rollout engine over one or more vLLM servers. A training run pushes its initial weights at start
    (`push_at_start`): a running server may hold another run's.

    urls: running servers (`http://host:port`), each started with `VLLM_SERVER_DEV_MODE=1`,
        `--logprobs-mode processed_logprobs` and `--weight-transfer-config '{"backend": BACKEND}'`, BACKEND the
        engine's weight backend.
    launch: start one server as a child process instead (`urls` must be empty), logging to `log_file`.
    timeout_s: deadline of every request, retries included; start_timeout_s: of a launched server's start.
    shm_dir: where the weights are written for the servers to read (same machine).
    weight_backend: how weights reach the servers: "rlkit_shm" (a shared-memory file: same machine, CPU or GPU),
        "nccl" (vLLM's NCCL engine: GPU, any machine that reaches `nccl_host`), or "auto" (nccl with CUDA, else
        rlkit_shm). nccl_host: the address the servers' workers reach this process at for NCCL.
    Under several ranks (an initialised process group) every rank builds the engine at the same time.
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        urls: list[str] | None = None,
        launch: bool = False,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_model_len: int = 1024,
        seed: int = 0,
        gpu_memory_utilization: float = 0.4,
        log_file: str = "vllm_server.log",
        extra_args: list[str] | None = None,
        timeout_s: float = 120.0,
        start_timeout_s: float = 600.0,
        max_concurrency: int = 64,
        shm_dir: str = "/dev/shm",
        weight_backend: str = "auto",
        nccl_host: str = "127.0.0.1",
    ):
        urls = list(urls or [])
        self.backend = weight_backend_for(weight_backend, torch.cuda.is_available())
        if launch == bool(urls):
            raise ValueError("vllm_server: give either urls=[...] (running servers) or launch=true, not "
                             f"{'both' if launch else 'neither'}. Fix: rollout.engine.options.urls=[http://HOST:PORT] "
                             "or rollout.engine.options.launch=true")
        self.ranks = Ranks.current()
        self.process: ServerProcess | None = None
        self.clients: list[ServerClient] = []
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="rlkit-vllm-server")
        self._writer = SharedMemoryWriter(shm_dir) if self.ranks.is_main and self.backend == SHM_BACKEND else None
        self._senders: list[NcclSender] = []  # one NCCL group per server (nccl)
        self._pushes = 0
        self._sampled_with = 0  # pushes the servers held when the last generation ran
        failure = None
        try:  # a failure on rank 0 is told to every rank (below); an interrupt stops a launched server on the way out
            if self.ranks.is_main:
                if launch:
                    port = port or free_port(host)
                    cmd = serve_command(model_path, host=host, port=port, dtype=dtype, max_model_len=max_model_len,
                                        seed=seed, backend=self.backend, cuda=torch.cuda.is_available(),
                                        gpu_memory_utilization=gpu_memory_utilization, extra_args=extra_args or [])
                    self.process = ServerProcess(cmd, log_file, env=serve_env(torch.cuda.is_available()))
                    urls = [f"http://{host}:{port}"]
                    self.process.wait_healthy(urls[0], start_timeout_s)
                exited = self.process.exit_reason if self.process is not None else None
                self.clients = [ServerClient(u, timeout_s=timeout_s, connections=max_concurrency, exited=exited)
                                for u in urls]
                for client in self.clients:
                    self._init_transfer(client, nccl_host)
        except Exception as err:
            failure = err
        except BaseException:
            self.close()
            raise
        # the servers, and the version prefix "<run>" of every push ("<run>:<n>"), as rank 0 has them
        urls, self._run, refusal = self.ranks.broadcast((urls, uuid.uuid4().hex[:12], failure and str(failure)))
        if failure is not None or refusal is not None:
            self.close()
            raise failure or ServerError(f"rank 0 could not set up the vLLM servers: {refusal}")
        if not self.ranks.is_main:
            self.clients = [ServerClient(u, timeout_s=timeout_s, connections=max_concurrency) for u in urls]

    push_at_start = True

    @property
    def expected_version(self) -> str:
        return f"{self._run}:{self._pushes}" if self._pushes else INITIAL_VERSION

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        """`sampling.n` completions per prompt, in prompt order; prompt i is seeded `seed + i * n` (as `vllm`)."""
        self.check_versions()
        share = [i * len(self.clients) // max(len(prompts), 1) for i in range(len(prompts))]
        futures = [self._pool.submit(self._complete, self.clients[share[i]], ids, sampling,
                                     None if sampling.seed is None else sampling.seed + i * sampling.n)
                   for i, ids in enumerate(prompts)]
        completions = []
        for index, future in enumerate(futures):
            completions += [Completion(index, *sample) for sample in future.result()]
        self.check_versions()  # a server that restarted during the step serves its initial weights
        self._sampled_with = self._pushes
        return completions

    def _complete(self, client: ServerClient, prompt: list[int], s: SamplingConfig, seed: int | None):
        body = {"prompt": prompt, "n": s.n, "temperature": s.temperature, "top_p": s.top_p,
                "top_k": s.top_k if s.top_k > 0 else 0, "max_tokens": s.max_tokens, "seed": seed,
                "stop_token_ids": list(s.stop_token_ids), "logprobs": 0, "return_token_ids": True,
                "skip_special_tokens": False}
        answer = client.post("/v1/completions", json=body)
        try:
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            out = []
            for choice in choices:
                tokens = list(choice["token_ids"] or [])
                logprobs = list(choice["logprobs"]["token_logprobs"]) if tokens else []
                if len(logprobs) != len(tokens) or len(choices) != s.n:
                    raise ValueError(f"{len(choices)} choices for n={s.n}, {len(logprobs)} logprobs for "
                                     f"{len(tokens)} tokens")
                if choice["finish_reason"] not in ("stop", "length"):
                    raise ValueError(f"finish_reason {choice['finish_reason']!r} (aborted by another client?)")
                out.append((tokens, [float(x) for x in logprobs], choice["finish_reason"]))
            return out
        except (KeyError, TypeError, ValueError) as err:
            raise ServerError(f"vLLM server at {client.url} sent a completion rlkit cannot use: {err}") from err

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write the weights once to shared memory, then on every server: pause (waiting for requests in
        flight), start, update, finish with version `<run>:<n>`, resume; the version each reports is checked.

        Several ranks: every rank calls it (a sharded Learner gathers the weights as they are read); rank 0 writes
        and pushes, and every rank checks the servers' version once rank 0 says the push is done."""
        self._pushes += 1
        failure = None
        if self.ranks.is_main:
            try:
                self._push(named_tensors)
            except Exception as err:
                failure = err
        else:
            for _ in named_tensors:  # each tensor read is a collective under FSDP2
                pass
        refusal = self.ranks.broadcast(failure and str(failure))
        if failure is not None:
            raise failure
        if refusal is not None:
            raise ServerError(f"rank 0's weight push to the vLLM servers failed: {refusal}")
        self.check_versions()

    def _push(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Rank 0: every server paused (requests in flight finish first), updated, resumed."""
        if self.backend == SHM_BACKEND:
            update_info = self._writer.write(named_tensors)
        else:
            tensors = nccl_tensors(named_tensors)
        for i, client in enumerate(self.clients):
            client.post("/pause", params={"mode": "wait"})
            try:
                if self.backend == SHM_BACKEND:
                    client.post("/start_weight_update", retry=False)
                    client.post("/update_weights", json={"update_info": update_info}, retry=False)
                    client.post("/finish_weight_update", json={"weight_version": self.expected_version}, retry=False)
                else:
                    self._senders[i].send(tensors, self.expected_version)
            finally:
                client.post("/resume")

    def versions(self) -> dict[str, str]:
        """{url: the weight version the server reports}."""
        return {c.url: str(c.get("/weight_info").get("weight_version")) for c in self.clients}

    def check_versions(self) -> None:
        """ServerError naming each server whose weights are not the last ones pushed."""
        wrong = {url: v for url, v in self.versions().items() if v != self.expected_version}
        if wrong:
            found = ", ".join(f"{url} reports {v!r}" for url, v in wrong.items())
            raise ServerError(f"vLLM server did not take the weights: expected version {self.expected_version!r}, "
                              f"{found}. A server that restarted or was pushed to by another run holds other "
                              f"weights; restart it for this run (a fresh server reports {INITIAL_VERSION!r})")

    def step_metrics(self) -> dict[str, float]:
        """rollout/weight_version: the pushes the servers held (each checked) when they sampled the last batch."""
        return {"rollout/weight_version": float(self._sampled_with)}

    def _init_transfer(self, client: ServerClient, nccl_host: str) -> None:
        try:
            if self.backend == SHM_BACKEND:
                client.post("/init_weight_transfer_engine", json={"init_info": {}}, retry=False)
            else:
                self._senders.append(NcclSender(client, nccl_host))
        except ServerError as err:
            raise ServerError(f"{err}\nFix: start the server with VLLM_SERVER_DEV_MODE=1 (vLLM's RL routes) and "
                              f"--weight-transfer-config '{{\"backend\": \"{self.backend}\"}}' (rollout.engine.options."
                              f"weight_backend), with rlkit installed where it runs (rlkit_shm is the "
                              f"`vllm.general_plugins` entry point rlkit_weight_transfer)") from None

    # ------------------------------------------------------------------ lifecycle
    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        """Stops a launched server, deletes the shared weights file; running servers (urls) are left running."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients:
            client.close()
        if self._writer is not None:
            self._writer.close()
        for sender in self._senders:
            sender.close()
        if self.process is not None:
            self.process.stop()
