"""Where log records go during a run: rlkit's progress on the console, library chatter in the run's file.

vLLM logs at INFO on every weight push and prefix-cache reset, which buries rlkit's progress bar
and step lines. `route_library_logs` sends every record of the libraries below to
``<run_dir>/train.log`` and lets only their errors reach the console (stderr). rlkit's own
logger keeps its console output and also writes to the file.
"""
from __future__ import annotations

import logging
from pathlib import Path

# Loggers whose records go to the run's file only (errors also to stderr). vLLM must not install its
# own stdout handler over this routing: `rlkit.rollout.vllm_engine` sets VLLM_CONFIGURE_LOGGING=0.
LIBRARY_LOGGERS = ("vllm", "transformers")
RLKIT_LOGGER = "rlkit"
LOG_FILE = "train.log"

_FILE_HANDLER = "rlkit.logs.file"
_CONSOLE_HANDLER = "rlkit.logs.console"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _drop_routed_handlers(logger: logging.Logger) -> None:
    """Remove the handlers a previous call installed on `logger` (closing the file once)."""
    for handler in list(logger.handlers):
        if handler.get_name() in (_FILE_HANDLER, _CONSOLE_HANDLER):
            logger.removeHandler(handler)
            handler.close()


def route_library_logs(run_dir: Path) -> None:
    """Send vLLM's and transformers' log records to ``<run_dir>/train.log``, errors also to stderr.

    The ``rlkit`` logger writes to the same file and keeps propagating to the console handler the
    entry point set up. A logger left at NOTSET is set to INFO so that the file gets INFO records.
    Idempotent: a second call (a second trainer in one process) moves the routing to the new file
    instead of adding handlers.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(_FORMAT)
    to_file = logging.FileHandler(run_dir / LOG_FILE, encoding="utf-8")
    to_file.set_name(_FILE_HANDLER)
    to_file.setFormatter(formatter)
    errors_to_console = logging.StreamHandler()  # stderr
    errors_to_console.set_name(_CONSOLE_HANDLER)
    errors_to_console.setLevel(logging.ERROR)
    errors_to_console.setFormatter(formatter)

    for name in (RLKIT_LOGGER, *LIBRARY_LOGGERS):
        logger = logging.getLogger(name)
        _drop_routed_handlers(logger)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
        if name == RLKIT_LOGGER:
            logger.addHandler(to_file)
            continue
        for handler in list(logger.handlers):  # the library's own console handler
            logger.removeHandler(handler)
        logger.propagate = False
        logger.addHandler(to_file)
        logger.addHandler(errors_to_console)
