"""What a run needs from this machine, checked before anything heavy loads: the model's files, optional packages."""
from __future__ import annotations

import os
from pathlib import Path

from rlkit.errors import require


def check_model_path(path: str) -> None:
    local = Path(path).expanduser()
    if local.exists():
        require((local / "config.json").is_file(), "model.path", f"{path} has no config.json",
                 "point model.path at a Hugging Face model directory")
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    require(not looks_local and not offline, "model.path", f"{path} does not exist"
             + (" and HF_HUB_OFFLINE is set" if offline else ""),
             "run `make setup` to prepare the default SmolLM2-135M-Instruct, or set model.path=<local dir or HF name>")
