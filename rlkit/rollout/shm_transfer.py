"""A vLLM weight-transfer backend that moves weights through a shared-memory file (CPU, same machine).

vLLM's own cross-process backends need CUDA (`nccl`, `ipc`). Here the trainer writes every weight into one
file under /dev/shm and sends, over the server's `/update_weights` route, only where each tensor lies in it
(names, dtypes, shapes, byte offsets: JSON, no pickle). The worker maps the same file and loads the tensors
inside vLLM's layerwise-reload protocol (`rlkit.rollout.shm_worker`, imported only inside the server).

The server loads this module through the `vllm.general_plugins` entry point `rlkit_weight_transfer`
(pyproject.toml), which calls `register()` in every vLLM process.
"""
from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path
from typing import Iterable

import torch

BACKEND_NAME = "rlkit_shm"
ALIGN = 64  # bytes: every tensor starts on a cache line
FILE_NAME = re.compile(r"rlkit-weights-(\d+)-[0-9a-f]+\.bin")  # rlkit-weights-<writer's pid>-<id>.bin


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


def views(buffer: torch.Tensor, layout: dict) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor viewing `buffer`) for each entry of a layout (names, dtype_names, shapes, offsets)."""
    out = []
    for name, dtype_name, shape, offset in zip(layout["names"], layout["dtype_names"], layout["shapes"],
                                               layout["offsets"]):
        dtype = _dtype(dtype_name)
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * dtype.itemsize
        out.append((name, buffer[offset:offset + nbytes].view(dtype).view(shape)))
    return out


class SharedMemoryWriter:
    """Trainer side: writes HF-named tensors into one shared file and returns the layout the server reads.

    The file (`directory`/rlkit-weights-<pid>-<id>.bin) is kept and rewritten at each push; `close()` deletes it.
    A writer killed before it could (SIGKILL, the OOM killer) leaves its file holding memory: a new writer deletes
    the files of writers no longer running (`remove_orphans`).
    """

    def __init__(self, directory: str = "/dev/shm"):
        remove_orphans(Path(directory))
        self.path = Path(directory) / f"rlkit-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}.bin"
        self._buffer: torch.Tensor | None = None

    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Copy every tensor into the file -> update_info for `/update_weights` (`path` + the layout)."""
        tensors = [(name, t.detach().contiguous().cpu()) for name, t in named_tensors]
        layout = {"path": str(self.path), "names": [], "dtype_names": [], "shapes": [], "offsets": []}
        offset = 0
        for name, t in tensors:
            layout["names"].append(name)
            layout["dtype_names"].append(str(t.dtype).removeprefix("torch."))
            layout["shapes"].append(list(t.shape))
            layout["offsets"].append(offset)
            offset += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        if self._buffer is None or self._buffer.numel() < offset:
            self._buffer = torch.from_file(str(self.path), shared=True, size=max(offset, 1), dtype=torch.uint8)
        for (_, t), (_, view) in zip(tensors, views(self._buffer, layout)):
            view.copy_(t)
        layout["size"] = self._buffer.numel()
        return layout

    def close(self) -> None:
        self._buffer = None
        self.path.unlink(missing_ok=True)


def remove_orphans(directory: Path) -> list[Path]:
    """Delete the weight files in `directory` whose writer's process is gone; returns them. A file of a running
    process (or of another user's, which this one may not signal or delete) stays."""
    removed = []
    for path in directory.glob("rlkit-weights-*.bin"):
        match = FILE_NAME.fullmatch(path.name)
        if match is None or _running(int(match.group(1))):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:  # gone already, or not ours to delete
            continue
        logging.getLogger("rlkit").warning("removed %s (%.2f GB), left by a weight writer that is no longer running",
                                           path, size / 1e9)
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        return True
    return True


def register() -> str:
    """Register the backend with vLLM in this process (idempotent; the plugin entry point); returns its name."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND_NAME not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND_NAME, "rlkit.rollout.shm_worker",
                                                    "SharedMemoryWeightTransferEngine")
    return BACKEND_NAME
