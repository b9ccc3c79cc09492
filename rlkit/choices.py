"""Config-group choices on the command line (`+recipe=NAME`, `data=NAME`), checked before Hydra composes, so a
misspelt one gets one line with the closest name instead of Hydra's search-path listing."""
from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path

from rlkit.config import CONFIG_DIR


def unknown_choice(argv: list[str], config_dir: Path = Path(CONFIG_DIR)) -> str | None:
    """The refusal (`key: problem. Fix: ...`) for the first `[+]GROUP=NAME` whose GROUP has no NAME.yaml."""
    for arg in argv:
        key, eq, choice = arg.partition("=")
        group = key.lstrip("+~").split("@")[0]
        folder = config_dir / group
        if not eq or not group or not folder.is_dir() or not re.fullmatch(r"[\w.-]+", choice):
            continue
        known = sorted(f.stem for f in folder.glob("*.yaml"))
        if choice in known:
            continue
        close = difflib.get_close_matches(choice, known, n=1, cutoff=0.5)
        prefix = key[: len(key) - len(key.lstrip("+~"))]
        fix = f"did you mean {prefix}{group}={close[0]}?" if close else f"use one of {prefix}{group}={'|'.join(known)}"
        return f"{group}={choice}: no {group} named {choice!r} (known: {', '.join(known)}). Fix: {fix}"
    return None


def exit_on_unknown_choice(argv: list[str]) -> None:
    """Print `rlkit: bad config: ...` (once, on rank 0) and exit 2 if `argv` names a choice that does not exist."""
    problem = unknown_choice(argv)
    if problem is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"rlkit: bad config: {problem}", file=sys.stderr)
        sys.exit(2)
