"""`vllm serve` as a child process of the trainer: started with the flags rlkit needs, waited for on /health
within a deadline, its output in a log file, and stopped (its whole process group) at the end, on errors,
on Ctrl-C and when the trainer dies."""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import httpx

from rlkit.rollout.server_http import ServerError

# Environment the server's processes get; rlkit's in-process settings (one process, logging off) must not leak in.
SERVER_ENV = {"VLLM_SERVER_DEV_MODE": "1"}  # registers vLLM's RL routes (/pause, /update_weights, /weight_info, ...)
DROPPED_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CONFIGURE_LOGGING")
PR_SET_PDEATHSIG = 1
CPU_KV_CACHE_GIB = "1"  # a launched CPU server's KV cache unless VLLM_CPU_KVCACHE_SPACE says otherwise


def free_port(host: str) -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def serve_command(model_path: str, *, host: str, port: int, dtype: str, max_model_len: int, seed: int,
                  backend: str, cuda: bool, gpu_memory_utilization: float, extra_args: list[str]) -> list[str]:
    """The `vllm serve` command line (as `python -m vllm.entrypoints.openai.api_server`, which the vllm-cpu
    package's `vllm` script cannot start: it looks up a distribution called `vllm`)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--host", host, "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
           "--seed", str(seed), "--enforce-eager", "--logprobs-mode", "processed_logprobs",
           "--weight-transfer-config", json.dumps({"backend": backend})]
    if cuda:
        cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    else:
        # A partially prefilled request rewinds its seeded generator, which CPU generators cannot do: whole prompts.
        cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(max_model_len, 8192))]
    return cmd + list(extra_args)


def serve_env(cuda: bool) -> dict[str, str]:
    """What a launched server's environment needs beyond the trainer's. On CPU: a KV cache of CPU_KV_CACHE_GIB
    (vLLM would reserve ~17-22 GiB and be OOM-killed on a 24 GiB machine) and every core bound (vLLM pins its
    worker to one), unless VLLM_CPU_KVCACHE_SPACE or VLLM_CPU_OMP_THREADS_BIND say otherwise."""
    if cuda:
        return {}
    return {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")}


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the trainer process dies, however it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


class ServerProcess:
    """One launched server. `stop()` is idempotent and also runs at interpreter exit."""

    def __init__(self, cmd: list[str], log_file: str, *, env: dict[str, str] | None = None):
        self.log_file = Path(log_file)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        child_env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        child_env.update(SERVER_ENV)
        child_env.update(env or {})
        self.command = cmd
        with open(self.log_file, "ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=child_env, start_new_session=True, preexec_fn=_die_with_parent)
        atexit.register(self.stop)

    def wait_healthy(self, url: str, deadline_s: float) -> None:
        """Return once GET url/health answers 200; ServerError with the log's last lines if the process exits
        or `deadline_s` passes first (the server is stopped then)."""
        started = time.monotonic()
        with httpx.Client(timeout=5.0) as http:
            while time.monotonic() - started < deadline_s:
                if self.proc.poll() is not None:
                    self._fail(f"exited with code {self.proc.returncode} while starting")
                try:
                    if http.get(f"{url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
        self._fail(f"did not answer {url}/health within {deadline_s:g} s "
                   f"(rollout.engine.options.start_timeout_s)")

    def _fail(self, what: str) -> None:
        self.stop()
        tail = self.tail()
        hint = ""
        if "Invalid weight transfer backend" in tail:
            hint = ("\nFix: the server does not know rlkit's weight-transfer backend, which it loads through the "
                    "`vllm.general_plugins` entry point `rlkit_weight_transfer`: install rlkit in the server's "
                    "environment (`pip install -e .` from the repository)")
        raise ServerError(f"vLLM server {what}; log {self.log_file}, last lines:\n{tail}{hint}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def exit_reason(self) -> str | None:
        """None while the server runs; else its exit code and the last lines of its log."""
        if self.alive():
            return None
        return f"exited with code {self.proc.returncode}; log {self.log_file}, last lines:\n{self.tail()}"

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_file, errors="replace") as log:
                return "".join(deque(log, maxlen=lines)).rstrip()
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace_s`; every process of it is gone after."""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        self._signal(signal.SIGKILL)  # stragglers of the group (vLLM's engine-core and worker processes)
        atexit.unregister(self.stop)

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
