"""Epoch-shuffled, resumable batches of prompt rows."""
from __future__ import annotations

import random


class PromptStream:
    """Epoch-shuffled, resumable iteration over rows in fixed-size batches.

    Each epoch visits every row once in an order fixed by (seed, epoch); a batch that reaches the end of
    an epoch continues into the next. state_dict() -> {"epoch", "position", "seed"}; load_state_dict()
    continues exactly where the saved stream was.
    """

    def __init__(self, rows: list[dict], batch_size: int, seed: int):
        if not rows:
            raise ValueError("PromptStream needs at least one row (check data.source / data.limit)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows = rows
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(f"rlkit-prompts:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self) -> list[dict]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self.rows):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self.rows) - self.position)
            batch.extend(self.rows[i] for i in self._order[self.position:self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        if not 0 <= position <= len(self.rows) or epoch < 0:
            raise ValueError(
                f"saved prompt stream position {position} (epoch {epoch}) does not fit {len(self.rows)} rows; "
                f"was the dataset changed since the checkpoint?"
            )
        self.seed, self.epoch, self.position = seed, epoch, position
        self._order = self._permutation(epoch)
