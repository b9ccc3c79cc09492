"""What the command lines (`python -m rlkit.train`, `python -m rlkit.eval`) share: Hydra's argv and the one-line
refusal. A leaf for them: it imports no rlkit module, so neither command borrows from the other."""
from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn


def refusal(kind: str, err: Exception) -> str:
    """The one line printed for a refused config or dataset: `rlkit: <kind>: <key>: <problem>. Fix: <fix>`."""
    return f"rlkit: {kind}: {' '.join(str(err).split())}"


def is_main_process() -> bool:
    """Rank 0 of a launched job (RANK, as accelerate launch and torchrun set it), or a lone process: the one that
    prints a refusal, so a job of N processes says it once."""
    return os.environ.get("RANK", "0") == "0"


def refuse(kind: str, err: Exception) -> NoReturn:
    """Print `refusal(kind, err)` to stderr (on the main process only) and exit with status 2."""
    if is_main_process():
        print(refusal(kind, err), file=sys.stderr)
    sys.exit(2)


def quiet_http_logs() -> None:
    """Keep httpx's INFO line per request (reward service, model critic) off the console; its warnings stay."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def hydra_argv(argv: list[str]) -> list[str]:
    """Hydra's arguments, with `--resolve` added to `--cfg`/`-c` so printed configs show values, not `${...}`."""
    if any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv) and "--resolve" not in argv:
        return [*argv, "--resolve"]
    return argv
