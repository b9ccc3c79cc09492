"""Asynchronous rollouts with bounded staleness, `trainer.max_staleness=k >= 1` (docs/async.md).

A producer thread collects the next batches (sample, score, filter, shape: `Trainer.collect_batch`) with the
weights the engine holds while the learner thread trains; k = 0 never builds this (the synchronous loop).

- The bound: the producer starts batch i only once the learner has finished with batch i - k (trained and
  pushed, or dropped), so a batch is at most k learner versions old when it is trained and at most k batches
  wait in memory (the queue holds k; a slow learner makes the producer wait for weights, never grow a backlog).
- The push: the producer holds `Trainer.engine_lock` for a whole batch; the learner pushes (and evaluates)
  under the same lock, so weights change only between the producer's batches. The server engine's pause
  (mode=wait) then finds no request in flight, and every sample of a batch comes from one version, stamped on
  it (`RolloutBatch.policy_version`).
- The learner trains a batch only if `learner.version - policy_version <= k` for every sample in it; an older
  batch is dropped whole and counted (async/dropped_stale: samples), never trained. Under the bound above that
  cannot happen (a safety net, tested with forged stamps).
- The schedule (`trainer.async_schedule`): `eager` samples batch i with whatever weights the engine holds once
  the learner is done with batch i - k (any version from i - k to i, by thread timing); `fixed` also makes the
  learner wait, before it pushes, until the producer has collected every batch the old weights must still
  sample, so batch i is always sampled by the weights pushed after batch i - k - 1 (version max(0, i - k)).
- State: the producer keeps its own data position, group numbering and token count; each batch carries them
  as they stood after it was drawn, and the trainer takes them over when it trains (or drops) the batch, so a
  checkpoint holds the state of the last batch trained. Under `fixed` the checkpoint also holds the batches
  collected and not yet trained (`in_flight`), handed to the learner first on resume; under `eager` they are
  drawn again.
  Plug-ins that run in collect() (sampler, group filter, reward shaper) report their step metrics and state
  from the producer thread, with the batch; the others run in the learner thread only.
"""
from __future__ import annotations

import collections
import copy
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlkit.sampling import Collected

if TYPE_CHECKING:
    from rlkit.trainer.trainer import Trainer

log = logging.getLogger("rlkit")

# The plug-ins that run inside collect(): in the producer thread under trainer.max_staleness >= 1.
PRODUCER_PLUGINS = ("algorithm.sampler", "algorithm.group_filter", "algorithm.reward_shaper")
SCHEDULES = ("eager", "fixed")
POLL_S = 0.1  # how often a waiting thread looks at the stop flag and the other thread's failure
STOP_TIMEOUT_S = 900.0  # the longest stop() waits for the producer's batch in flight (requests time out first)


@dataclass
class Produced:
    """One collected batch in the queue. index: its batch number (sampling seed); version: the learner version
    the engine held while it was collected; after: the producer's state once it was drawn (next_group_id,
    generated_tokens, stream, next_batch); plugin_state: the producer plug-ins' state then; metrics: their step
    metrics and the engine's; waited_s: how long the producer waited for weights before it; began/ended: its
    collection's start and end in seconds since the producer started."""

    index: int
    version: int
    collected: Collected
    after: dict
    plugin_state: dict
    metrics: dict
    waited_s: float
    began: float
    ended: float


def staleness(learner_version: int, batch_versions: torch.Tensor) -> torch.Tensor:
    """Learner versions between each sample's weights and the learner's: [B] long -> [B] long (>= 0)."""
    return learner_version - batch_versions


def collected_before_push(index: int, k: int) -> int:
    """Fixed schedule: how many batches (indices 0 .. n-1) must be collected before the learner, done with batch
    `index`, pushes its weights: the batches up to index + k, which the weights before the push must sample."""
    return index + k + 1


class AsyncRollouts:
    """The producer thread and the learner's side of the queue for one `Trainer.fit`."""

    def __init__(self, trainer: Trainer, max_staleness: int, schedule: str, carried: list[Produced] = ()):
        """carried: batches a `fixed` checkpoint held in flight (`in_flight`), trained first; the producer goes on
        after the last of them (its data position and producer plug-ins' state)."""
        if max_staleness < 1:
            raise ValueError(f"trainer.max_staleness: AsyncRollouts needs k >= 1, got {max_staleness}")
        if schedule not in SCHEDULES:
            raise ValueError(f"trainer.async_schedule: unknown schedule {schedule!r}. Fix: use one of {SCHEDULES}")
        self.trainer, self.k, self.fixed = trainer, max_staleness, schedule == "fixed"
        self.queue: queue.Queue[Produced] = queue.Queue(maxsize=max_staleness)
        self.finished = trainer.next_batch  # batches the learner is done with (trained and pushed, or dropped)
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.dropped_total = 0
        self.consumed = {"next_group_id": trainer.next_group_id, "generated_tokens": trainer.generated_tokens,
                         "stream": trainer.stream.state_dict(), "next_batch": trainer.next_batch}
        self.consumed_plugins = self._plugin_state()
        self.carried = collections.deque(carried)  # taken before the queue
        self.in_flight = collections.deque(carried)  # collected, the learner not done with them (under `changed`)
        self.start = dict(self.consumed)  # where the producer begins
        if carried:
            last = carried[-1]
            self.start = last.after
            trainer.stream.load_state_dict(last.after["stream"])
            for key, state in last.plugin_state.items():
                trainer.plugins[key].load_state_dict(copy.deepcopy(state))
        self.collected = self.start["next_batch"]  # batches collected (indices below it)
        self.training = self.finished  # the index of the batch the learner trains
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._produce, name="rlkit-producer", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ producer thread
    def _produce(self) -> None:
        t = self.trainer
        index, group_id, tokens = self.start["next_batch"], self.start["next_group_id"], self.start["generated_tokens"]
        try:
            while True:
                tick = time.perf_counter()
                self.before_batch(index)
                if not self._wait_for_room(index):
                    return
                waited = time.perf_counter() - tick
                with t.engine_lock:  # the learner pushes between batches
                    version = t.engine_version
                    began = time.perf_counter() - self.t0
                    collected = t.collect_batch(index, group_id, version, token_stats=None)
                    engine_metrics = getattr(t.engine, "step_metrics", dict)()
                    ended = time.perf_counter() - self.t0
                metrics = dict(engine_metrics)
                for key in PRODUCER_PLUGINS:
                    metrics.update(t.plugins[key].step_metrics())
                group_id, tokens, index = collected.next_group_id, tokens + collected.generated_tokens, index + 1
                after = {"next_group_id": group_id, "generated_tokens": tokens, "stream": t.stream.state_dict(),
                         "next_batch": index}
                item = Produced(index - 1, version, collected, after, self._plugin_state(), metrics, waited, began,
                                ended)
                with self.changed:  # collected: a fixed-schedule learner may push; a checkpoint holds it
                    self.in_flight.append(item)
                    self.collected = index
                    self.changed.notify_all()
                while not self._put(item):
                    if self.stopping.is_set():
                        return
        except BaseException as err:  # the learner raises it at its next wait
            self.error = err
            log.exception("rollout producer failed")

    def before_batch(self, index: int) -> None:
        """Called by the producer before it waits for batch `index`'s weights (tests slow the producer here)."""

    def _wait_for_room(self, index: int) -> bool:
        """Wait until batch `index` may start: the learner is done with batch index - k (the staleness bound) and
        the batches already drawn do not cover the steps left (under `fixed`: plus the k batches after the last
        step, which the last push waits for and the final checkpoint holds). False once stop() was called."""
        t = self.trainer
        ahead = self.k if self.fixed else 0
        with self.changed:
            while not self.stopping.is_set():
                needed = t.cfg.trainer.total_steps - t.step + ahead
                if self.finished >= index - self.k and index - self.finished < needed:
                    return True
                self.changed.wait(POLL_S)
        return False

    def _put(self, item: Produced) -> bool:
        try:
            self.queue.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            return False

    def _plugin_state(self) -> dict:
        return {key: copy.deepcopy(self.trainer.plugins[key].state_dict())
                for key in PRODUCER_PLUGINS if self.trainer.plugins[key].stateful}

    # ------------------------------------------------------------------ learner thread
    def train_step(self) -> dict[str, float]:
        """Take the next batch within the bound (older ones dropped and counted), train on it, push; its metrics."""
        t, learner = self.trainer, self.trainer.learner
        start = time.perf_counter()
        depth, dropped = self.queue.qsize(), 0  # batches ready when the learner asked (0: it waits)
        while True:
            item = self._take()
            ages = staleness(learner.version, item.collected.batch.policy_version)
            if int(ages.max()) <= self.k if len(ages) else learner.version - item.version <= self.k:
                break
            dropped += len(item.collected.batch)
            log.warning("dropped batch %d: sampled at version %d, the learner is at %d (trainer.max_staleness=%d)",
                        item.index, item.version, learner.version, self.k)
            self._finish(item)
        self.dropped_total += dropped
        waited = time.perf_counter() - start
        t.next_group_id, t.generated_tokens = item.after["next_group_id"], item.after["generated_tokens"]
        t.next_batch = item.after["next_batch"]
        self.training = item.index
        age = float(learner.version - item.version)
        produced = {
            **item.metrics,
            "async/staleness_mean": float(ages.float().mean()) if len(ages) else age,
            "async/staleness_max": float(ages.max()) if len(ages) else age,
            "async/policy_version": float(item.version),
            "async/batch_index": float(item.index),
            "async/dropped_stale": float(dropped),
            "async/dropped_stale_total": float(self.dropped_total),
            "async/queue_depth": float(depth),
            "time/learner_wait_data": waited,
            "time/producer_wait_weights": item.waited_s,
            "time/produce_begin": item.began,
            "time/produce_end": item.ended,
            "time/train_begin": time.perf_counter() - self.t0,
        }
        metrics = t.train_on(item.collected, start, produced)
        self._finish(item)
        return metrics

    def before_push(self) -> float:
        """Called by the learner before it pushes the weights of the batch it trained; under `fixed` it waits until
        the producer has collected every batch the current weights must still sample. Seconds waited."""
        if not self.fixed:
            return 0.0
        tick, needed = time.perf_counter(), collected_before_push(self.training, self.k)
        with self.changed:
            while self.collected < needed:
                self._check_producer("the learner waits to push")
                self.changed.wait(POLL_S)
        return time.perf_counter() - tick

    def _take(self) -> Produced:
        if self.carried:
            return self.carried.popleft()
        while True:
            try:
                return self.queue.get(timeout=POLL_S)
            except queue.Empty:
                self._check_producer("the learner waits for a batch")

    def _check_producer(self, waiting: str) -> None:
        if self.error is not None:
            raise RuntimeError(f"the rollout producer failed: {self.error!r}") from self.error
        if not self.thread.is_alive():
            raise RuntimeError(f"the rollout producer stopped while {waiting}")

    def _finish(self, item: Produced) -> None:
        """The learner is done with `item`: its state becomes the checkpoint's; the producer may go on."""
        self.consumed, self.consumed_plugins = item.after, item.plugin_state
        with self.changed:
            self.in_flight.popleft()
            self.finished += 1
            self.changed.notify_all()

    def checkpoint_state(self, state: dict, plugin_state: dict) -> tuple[dict, dict]:
        """The trainer's checkpoint state as of the last batch trained or dropped (not the producer's, ahead)."""
        c = self.consumed
        state = {**state, "next_group_id": c["next_group_id"], "generated_tokens": c["generated_tokens"],
                 "stream": c["stream"], "next_batch": c["next_batch"]}
        return state, {**plugin_state, **self.consumed_plugins}

    def checkpoint_in_flight(self) -> list[Produced]:
        """Under `fixed`: the batches collected and not yet trained, in order (a resume trains them first; the
        producer's state after the last of them is in it). Under `eager`: none (drawn again on resume)."""
        with self.changed:
            return list(self.in_flight) if self.fixed else []

    def stop(self) -> None:
        """Stop the producer: a batch being collected finishes (no request is left in flight), the queue's
        batches are dropped (kept in `in_flight` for a `fixed` checkpoint). Bounded by the engine's request timeouts."""
        self.stopping.set()
        with self.changed:
            self.changed.notify_all()
        self.thread.join(STOP_TIMEOUT_S)
        if self.thread.is_alive():
            log.error("the rollout producer did not stop within %.0f s; leaving it (a daemon thread)", STOP_TIMEOUT_S)
        while not self.queue.empty():
            self.queue.get_nowait()
