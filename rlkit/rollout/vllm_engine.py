"""vLLM rollout engine, colocated in the trainer's process."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterable, Iterator, Literal

import torch

from rlkit.rollout.base import Completion, SamplingConfig


CPU_KV_CACHE_GIB = 1.0  # the KV cache on CPU when kv_cache_gib is None and VLLM_CPU_KVCACHE_SPACE unset
MAX_MODEL_LEN = 1024  # prompt + response tokens per sequence unless max_model_len says otherwise


def _configure_vllm_env() -> None:
    """Environment vLLM reads at import/start; set before vllm is imported. In this process the engine runs on
    torch's threads, the trainer's (vLLM reads VLLM_CPU_OMP_THREADS_BIND only for worker processes it starts)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process
    if "VLLM_LOGGING_CONFIG_PATH" not in os.environ:  # vLLM refuses a config file with its logging off
        # rlkit routes vLLM's records (rlkit.logs); vLLM would replace that with its own stdout handler.
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


def _kv_storages(worker) -> list[torch.UntypedStorage]:
    """The distinct storages under a vLLM worker's KV cache tensors (layers may view one buffer)."""
    storages = {}
    for tensor in worker.model_runner.kv_caches:
        storage = tensor.untyped_storage()
        storages.setdefault(storage._cdata, storage)  # the C++ storage itself: data pointers change on resize
    return list(storages.values())


def release_kv_cache(worker) -> None:
    """On the vLLM worker (`LLM.collective_rpc`): every KV cache storage resized to nothing, its size kept. The
    cache's tensors stay as they are, views of storages that hold no memory until `restore_kv_cache`."""
    worker.rlkit_released_kv = [(storage, storage.nbytes()) for storage in _kv_storages(worker)]
    for storage, _ in worker.rlkit_released_kv:
        storage.resize_(0)


def restore_kv_cache(worker) -> None:
    """On the vLLM worker: the storages `release_kv_cache` emptied, allocated again at their size and zeroed (as
    vLLM allocates them), so the cache's tensors are whole again."""
    for storage, nbytes in worker.rlkit_released_kv:
        storage.resize_(nbytes)
        storage.fill_(0)
    worker.rlkit_released_kv = []


@contextmanager
def _env_hidden(*names: str) -> Iterator[None]:
    """The environment variables `names` removed from os.environ inside the block, restored after it."""
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class VLLMEngine:
    """`vllm.LLM` in-process; weights pushed through vLLM's RL weight-transfer API.

    Logprobs are vLLM's processed logprobs (after temperature), so they are directly
    the behaviour policy's logprobs the trainer compares against.
    """

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int = MAX_MODEL_LEN,
        gpu_memory_utilization: float = 0.4,
        enable_prefix_caching: bool = True,
        enable_sleep_mode: bool = False,
        seed: int = 0,
        kv_cache_gib: float | Literal["auto"] | None = None,
        max_num_seqs: int | None = None,
        release_kv_cache: bool = False,
    ):
        """kv_cache_gib (CPU): the KV cache's size, allocated and zeroed at start (None: VLLM_CPU_KVCACHE_SPACE if
        set, else CPU_KV_CACHE_GIB; vLLM alone would take most of the free memory; `rlkit.rollout.make_engine` turns
        the config's `auto` into the size of the batch, rlkit.rollout.kv_cache).
        max_num_seqs: sequences vLLM decodes at once (None: vLLM's default for the platform).
        release_kv_cache (CPU, where vLLM has no sleep mode): `sleep` returns the KV cache's memory to the system
        and `wake` allocates and zeroes it again, so the cache is not resident while the trainer updates."""
        if kv_cache_gib == "auto":
            raise ValueError("kv_cache_gib='auto' is sized from the batch: build the engine with "
                             "rlkit.rollout.make_engine(spec, model_path, dtype, shape), or give a size in GiB")
        _configure_vllm_env()
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        from rlkit.rollout.inprocess_transfer import register

        kwargs = {} if max_num_seqs is None else {"max_num_seqs": max_num_seqs}
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            kwargs["enable_sleep_mode"] = enable_sleep_mode
        else:
            # A partially prefilled request rewinds its seeded generator, which CPU generators cannot do
            # (vLLM 0.32: "CPU Generator does not use offset"): prefill whole prompts instead.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_model_len, 8192)
            if kv_cache_gib is not None or "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                kwargs["kv_cache_memory_bytes"] = int((kv_cache_gib or CPU_KV_CACHE_GIB) * 2**30)
        # vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE (whole GiB) override kv_cache_memory_bytes while the
        # engine starts: hidden for that time only, so servers and engines started later still see it
        hidden = ("VLLM_CPU_KVCACHE_SPACE",) if "kv_cache_memory_bytes" in kwargs else ()
        with _env_hidden(*hidden):
            self.llm = LLM(
                model=model_path,
                dtype=dtype,
                max_model_len=max_model_len,
                seed=seed,
                enforce_eager=True,
                distributed_executor_backend="uni",
                enable_prefix_caching=enable_prefix_caching,
                logprobs_mode="processed_logprobs",
                weight_transfer_config=WeightTransferConfig(backend=register()),
                **kwargs,
            )
        self.llm.init_weight_transfer_engine({"init_info": {}})
        self._version = 0
        self._sleeping = False
        self._sleep_mode = enable_sleep_mode and torch.cuda.is_available()
        self._release_kv_cache = release_kv_cache and not torch.cuda.is_available()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        from vllm import SamplingParams

        requests = [{"prompt_token_ids": ids} for ids in prompts]
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_tokens,
                seed=None if sampling.seed is None else sampling.seed + i * sampling.n,
                stop_token_ids=list(sampling.stop_token_ids),
                logprobs=0,
                flat_logprobs=True,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        completions = []
        for index, request_output in enumerate(outputs):
            for sample in sorted(request_output.outputs, key=lambda o: o.index):
                token_ids = list(sample.token_ids)
                logprobs = list(sample.logprobs.logprobs) if token_ids else []
                if len(logprobs) != len(token_ids):
                    raise RuntimeError(f"vLLM returned {len(logprobs)} logprobs for {len(token_ids)} tokens")
                completions.append(
                    Completion(index, token_ids, logprobs, "length" if sample.finish_reason == "length" else "stop")
                )
        return completions

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        self._version += 1
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": {"weights": [(n, t.detach()) for n, t in named_tensors]}})
        self.llm.finish_weight_update(weight_version=str(self._version))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def sleep(self) -> None:
        """Frees vLLM's weights and KV cache (GPU with rollout.engine.options.enable_sleep_mode), or the KV cache
        (CPU with release_kv_cache); else nothing."""
        if self._sleeping or not (self._sleep_mode or self._release_kv_cache):
            return
        if self._sleep_mode:
            self.llm.sleep(level=1)
        else:
            self.llm.collective_rpc(release_kv_cache)
        self._sleeping = True

    def wake(self) -> None:
        """Undoes `sleep`: a released KV cache comes back zeroed, and no prefix is cached in it any more."""
        if not self._sleeping:
            return
        if self._sleep_mode:
            self.llm.wake_up()
        else:
            self.llm.collective_rpc(restore_kv_cache)
            self.llm.reset_prefix_cache()
        self._sleeping = False

    def kv_cache_bytes(self) -> int:
        """Bytes the KV cache holds now (0 while released)."""
        return sum(self.llm.collective_rpc(lambda worker: sum(s.nbytes() for s in _kv_storages(worker))))

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            del self.llm
