"""A pool of long-lived verifier worker processes with per-item wall-clock timeouts.

Each worker is a fresh Python interpreter (``subprocess`` + exec: the trainer's process
hosts threads, e.g. a vLLM engine, so fork is unsafe; and unlike multiprocessing's
"spawn" it does not re-import the caller's ``__main__``, so workers never pay for the
trainer's torch/vLLM imports and scripts need no ``if __name__ == "__main__"`` guard).
It talks to the parent over a socket wrapped as a ``multiprocessing`` Connection and
scores one item at a time. The parent hands items to idle workers and waits on their
connections with a deadline per item; a worker that misses its deadline is killed and
replaced, one that dies is replaced, and only the item it held becomes unscorable.
Workers import the verifier's dependencies once at start-up (``prepare``, about 2 s
for math-verify), so keep one pool for the whole run.

Workers never outlive their parent, even in the middle of a long item: on Linux the kernel
kills them when the thread that started them ends (``PR_SET_PDEATHSIG``; a pool's workers
are started by the threads that call it), elsewhere a watcher thread in the worker notices
the new parent. As a last line of defence each worker ends itself (SIGALRM, default action)
once an item runs ``OWN_DEADLINE_MARGIN_S`` past the parent's timeout. The worker's side is
`rlkit.reward.pool_worker`.
"""
from __future__ import annotations

import enum
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from rlkit.reward.pool_worker import READY
from rlkit.reward.verifier_options import check_options
from rlkit.reward.verifiers import VERIFIERS, Score, check_score_inputs, score_one

# The worker's whole command line: everything else arrives over the connection.
_BOOTSTRAP = "import sys; from rlkit.reward.pool_worker import main; main(int(sys.argv[1]), int(sys.argv[2]))"
_KILL_GRACE_S = 1.0


class _State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"


@dataclass
class _Worker:
    process: subprocess.Popen
    conn: Connection
    state: _State
    deadline: float  # STARTING: start-up deadline; BUSY: the item's deadline
    item: int | None = None


def _import_path() -> str:
    """The parent's sys.path as PYTHONPATH, so workers import what the parent can (rlkit, user verifiers)."""
    return os.pathsep.join(os.path.abspath(entry or os.curdir) for entry in sys.path)


class VerifierPool:
    """Scores (response, reference) pairs in worker processes with a per-item wall-clock timeout enforced from outside;
    a hung or crashed worker is killed and replaced, only its item becomes unscorable (reward None, error "timeout"/"worker_crash").

    ``num_workers=0`` scores in this process with no timeout (for debugging).
    ``stats`` holds cumulative counts: scored (reward not None), unscorable, timeouts,
    crashes, restarts. Not for concurrent use from several threads (calls are serialised).
    """

    def __init__(
        self,
        verifier: str,
        *,
        num_workers: int = 2,
        timeout_s: float = 10.0,
        options: dict | None = None,
        startup_timeout_s: float = 120.0,
    ):
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0 (0 scores in-process), got {num_workers!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0 seconds, got {startup_timeout_s!r}")
        options = dict(options or {})
        check_options(verifier, VERIFIERS.get(verifier), options)  # unknown name / bad options fail here
        try:
            pickle.dumps(options)
        except Exception as err:
            raise TypeError(f"verifier options must be picklable to reach the workers: {err}") from err
        self.verifier = verifier
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.options = options
        self.stats: dict[str, int] = dict(scored=0, unscorable=0, timeouts=0, crashes=0, restarts=0)
        self._lock = threading.Lock()
        self._closed = False
        self._aborted = False
        self._workers: list[_Worker] = []  # replaced in place, so the finalizer sees the live list
        self._finalizer = weakref.finalize(self, _close_all, self._workers)
        # Started now and not awaited: start-up (imports) overlaps whatever the caller does next.
        for _ in range(num_workers):
            self._workers.append(self._start_worker())

    # ------------------------------------------------------------------ public

    def score(self, responses: list[str], references: list[str]) -> list[Score]:
        """Score ``responses[i]`` against ``references[i]``; results in input order."""
        check_score_inputs(responses, references)
        with self._lock:
            if self._closed:
                raise RuntimeError("VerifierPool is closed; create a new one")
            if self.num_workers == 0:
                results = [score_one(self.verifier, r, g, self.options) for r, g in zip(responses, references)]
            else:
                try:
                    results = self._score_in_workers(responses, references)
                except BaseException:
                    # Items may still be in flight; their late answers would be misread by
                    # the next call, so this pool is finished.
                    self._close_workers()
                    raise
            for result in results:
                self.stats["scored" if result.reward is not None else "unscorable"] += 1
            return results

    def close(self) -> None:
        """Stop every worker (ask, then terminate, then kill). Idempotent."""
        with self._lock:
            self._close_workers()

    def abort(self) -> None:
        """Kill every worker now, from any thread (for shutdown: a ``score`` in progress then raises
        instead of replacing them, and nobody waits for its items). ``close`` still reaps them."""
        self._aborted = True
        for worker in list(self._workers):
            if worker.process.poll() is None:
                worker.process.kill()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _start_worker(self) -> _Worker:
        parent_sock, child_sock = socket.socketpair()
        with child_sock:
            process = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(child_sock.fileno()), str(os.getpid())],
                pass_fds=(child_sock.fileno(),),
                env=dict(os.environ, PYTHONPATH=_import_path()),
            )
        # Only the child holds its end now, so the child's death reads as EOF here.
        conn = Connection(parent_sock.detach())
        conn.send((self.verifier, self.options, self.timeout_s, self.startup_timeout_s))
        return _Worker(process, conn, _State.STARTING, time.monotonic() + self.startup_timeout_s)

    def _replace(self, index: int) -> None:
        _stop(self._workers[index], grace_s=0.0)
        if self._aborted:
            raise RuntimeError("VerifierPool was aborted while scoring; its workers are gone")
        self._workers[index] = self._start_worker()
        self.stats["restarts"] += 1

    def _score_in_workers(self, responses: list[str], references: list[str]) -> list[Score]:
        results: list[Score | None] = [None] * len(responses)
        todo = deque(range(len(responses)))
        while todo or any(w.state is _State.BUSY for w in self._workers):
            for index, worker in enumerate(self._workers):
                if worker.state is _State.IDLE and todo:
                    self._dispatch(index, todo, responses, references)

            watched = {}
            for index, worker in enumerate(self._workers):
                if worker.state is not _State.IDLE:
                    watched[worker.conn] = index
            # Non-empty: a dispatch either made its worker BUSY or replaced it (STARTING).
            next_deadline = min(self._workers[i].deadline for i in set(watched.values()))
            ready = {watched[obj] for obj in wait(list(watched), timeout=max(0.0, next_deadline - time.monotonic()))}
            now = time.monotonic()
            for index in sorted(set(watched.values())):
                if index in ready:
                    self._collect(index, results)
                elif now >= self._workers[index].deadline:
                    self._expire(index, results)
        return results  # type: ignore[return-value]  # every slot was filled

    def _dispatch(self, index: int, todo: deque, responses: list[str], references: list[str]) -> None:
        worker = self._workers[index]
        item = todo.popleft()
        try:
            if worker.process.poll() is not None:
                raise BrokenPipeError
            worker.conn.send((responses[item], references[item]))
        except (BrokenPipeError, ConnectionResetError):
            # Died while idle (e.g. killed from outside): not this item's doing.
            todo.appendleft(item)
            self._replace(index)
            return
        worker.state, worker.item = _State.BUSY, item
        worker.deadline = time.monotonic() + self.timeout_s

    def _collect(self, index: int, results: list[Score | None]) -> None:
        """Read what a watched worker reported, or handle its death."""
        worker = self._workers[index]
        message = None
        if worker.conn.poll():
            try:
                message = worker.conn.recv()
            except (EOFError, ConnectionResetError):
                message = None
        if message is None:  # died: EOF, or a message cut short
            if worker.state is _State.STARTING:
                code = _wait(worker.process, _KILL_GRACE_S)
                raise RuntimeError(
                    f"verifier worker for {self.verifier!r} exited during start-up (exit code {code}); "
                    f"its traceback is on stderr above"
                )
            results[worker.item] = Score(None, False, None, "worker_crash")
            self.stats["crashes"] += 1
            self._replace(index)
            return
        if worker.state is _State.STARTING:
            if message != READY:
                raise RuntimeError(f"verifier worker sent {message!r} instead of {READY!r} at start-up")
            worker.state = _State.IDLE
            return
        results[worker.item] = message
        worker.state, worker.item = _State.IDLE, None

    def _expire(self, index: int, results: list[Score | None]) -> None:
        worker = self._workers[index]
        if worker.state is _State.STARTING:
            raise RuntimeError(
                f"verifier worker for {self.verifier!r} did not start within {self.startup_timeout_s} s "
                f"(startup_timeout_s); check that its imports work in a fresh Python process"
            )
        results[worker.item] = Score(None, False, None, "timeout")
        self.stats["timeouts"] += 1
        self._replace(index)

    def _close_workers(self) -> None:
        self._closed = True
        self._finalizer()  # runs _close_all once, whether from here, garbage collection or exit


def _close_all(workers: list[_Worker]) -> None:
    """Stop every worker: idle ones are asked to exit (all first, so they exit together), then reaped."""
    idle = [worker.state is _State.IDLE for worker in workers]
    for worker, asked in zip(workers, idle):
        if asked:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, ConnectionResetError):
                pass  # already gone: _stop reaps it
    for worker, asked in zip(workers, idle):
        _stop(worker, grace_s=_KILL_GRACE_S if asked else 0.0)
    workers.clear()


def _wait(process: subprocess.Popen, timeout_s: float) -> int | None:
    """The process's exit code once it exits within ``timeout_s``, else None."""
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return None


def _stop(worker: _Worker, *, grace_s: float) -> None:
    """End a worker process and release its connection: give it ``grace_s`` to exit, then terminate, then kill."""
    process = worker.process
    if grace_s > 0:
        _wait(process, grace_s)
    if process.poll() is None:
        process.terminate()
        if _wait(process, _KILL_GRACE_S) is None:
            process.kill()
            process.wait()
    worker.conn.close()

