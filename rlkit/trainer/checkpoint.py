"""Atomic, resumable checkpoints: runs/<name>/checkpoints/step_N/ (docs/architecture.md, "Checkpoints")."""
from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from rlkit.errors import ConfigError
from rlkit.ranks import Ranks

STATE_FILE = "trainer_state.json"
IN_FLIGHT_FILE = "in_flight.pt"  # async, fixed schedule: batches collected and not yet trained
TEMP_PREFIX = ".step_"  # step_N is written as .step_N.<random> and renamed when complete

log = logging.getLogger("rlkit")


def save_checkpoint(root: Path, step: int, *, learner, ranks: Ranks = Ranks(), save_optimizer: bool, state: dict,
                    plugin_state: dict, keep_last: int, in_flight: dict | None = None) -> Path:
    """Write step_N through a temp dir + rename, so a crash never leaves a half checkpoint; prune old ones.

    learner: a `rlkit.trainer.learner.Learner` (its HF model and tokenizer, optimizer, scheduler, version).
    save_optimizer: False leaves the optimizer state out (AdamW's is twice the model's size); a resume then
    restarts it. state: JSON-able trainer state; plugin_state: config key -> state_dict of each stateful plug-in.
    Every rank calls it: the RNG states of all ranks (and a sharded learner's state) are gathered and rank 0 writes;
    the others wait for it. in_flight: {"max_staleness", "batches": [AsyncRollouts' Produced]} of an async run
    (batches collected and not yet trained: token ids, logprobs, rewards, the producer's state after each), or None.
    """
    rng = ranks.gather({"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()})
    final = root / f"step_{step}"
    tmp = None
    if ranks.is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{step}.", dir=root))
    learner.save_pretrained(None if tmp is None else tmp / "model")  # every rank: a sharded learner gathers
    learner_state = learner.state_dict(optimizer=save_optimizer)
    if ranks.is_main:
        torch.save({**learner_state, "rng": rng, "plugins": plugin_state}, tmp / "optim.pt")
        if in_flight is not None:
            torch.save(in_flight, tmp / IN_FLIGHT_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "world_size": ranks.world_size, **state}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    ranks.barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete the temp dirs of checkpoints that were never completed (a crash or kill during a save)."""
    stale = [p for p in root.glob(f"{TEMP_PREFIX}*") if p.is_dir()] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path)
    return stale


def load_checkpoint(path: Path, *, learner, ranks: Ranks = Ranks()) -> tuple[dict, dict]:
    """Restore the learner (weights, optimizer, scheduler, version) and this rank's RNG from `path`; return
    (trainer state, plug-in states). A checkpoint saved without optimizer state leaves the optimizer fresh,
    with a warning. A checkpoint saved by another number of processes is refused (ConfigError), naming it.
    """
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    saved_world = state.get("world_size", 1)
    if saved_world != ranks.world_size:
        raise ConfigError(
            f"trainer.resume: {path} was saved by {saved_world} process(es) and this job has {ranks.world_size}; "
            f"each rank's random state is saved and restored. Fix: launch with {saved_world} process(es) "
            f"(accelerate launch --num_processes {saved_world}), or start a fresh run")

    weights = {}
    for shard in sorted((path / "model").glob("*.safetensors")):
        weights.update(load_file(shard))
    try:
        learner.load_weights(weights)
    except RuntimeError as err:
        raise RuntimeError(f"checkpoint {path}: {err}") from None
    blob = torch.load(path / "optim.pt", weights_only=False)
    if blob["optimizer"] is None:
        log.warning("resume: %s holds no optimizer state (trainer.save_optimizer=false): AdamW's moments restart "
                    "from zero, so the run does not continue exactly as an uninterrupted one", path)
    learner.load_state_dict({"version": state["step"], **blob})
    rng = blob["rng"][ranks.rank] if isinstance(blob["rng"], list) else blob["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    return state, blob["plugins"]


def load_in_flight(path: Path) -> dict | None:
    """The batches in flight a checkpoint holds ({"max_staleness", "batches"}), or None (none were saved)."""
    file = path / IN_FLIGHT_FILE
    return torch.load(file, weights_only=False) if file.is_file() else None
