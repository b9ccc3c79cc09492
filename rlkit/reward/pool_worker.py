"""The worker process of `rlkit.reward.pool.VerifierPool`: prepare a verifier once, then score items.

Started as a fresh interpreter with a connected socket's file descriptor and the parent's pid. It
receives (verifier, options, timeout, start-up timeout), calls the verifier's ``prepare``, answers
``READY``, then scores one ``(response, reference)`` per message until it receives ``None`` or the
parent goes away. It never outlives its parent (``PR_SET_PDEATHSIG`` on Linux, a watcher thread
elsewhere) and ends itself once an item runs ``OWN_DEADLINE_MARGIN_S`` past its timeout.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection

from rlkit.reward.verifiers import VERIFIERS, score_one

READY = "ready"
OWN_DEADLINE_MARGIN_S = 2.0  # a worker past its timeout by this much ends itself; the parent kills it sooner
_PARENT_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(fd: int, parent_pid: int) -> None:
    """Worker process: receive (verifier, options, timeouts), prepare once, then score items until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(parent_pid)
    conn = Connection(fd)
    verifier, options, timeout_s, startup_timeout_s = conn.recv()
    prepare = getattr(VERIFIERS.get(verifier), "prepare", None)
    if prepare is not None:
        _own_deadline(startup_timeout_s + OWN_DEADLINE_MARGIN_S)
        prepare()
        _own_deadline(0.0)
    conn.send(READY)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        response, reference = message
        _own_deadline(timeout_s + OWN_DEADLINE_MARGIN_S)
        score = score_one(verifier, response, reference, options)
        _own_deadline(0.0)
        conn.send(score)


def _own_deadline(seconds: float) -> None:
    """End this process ``seconds`` from now, even inside a long C call (0: cancel): SIGALRM's default action."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a verifier may have installed its own handler
    signal.setitimer(signal.ITIMER_REAL, seconds)


def _die_with_parent(parent_pid: int) -> None:
    """Have this worker killed when its parent ends: PR_SET_PDEATHSIG on Linux, and a watcher thread."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent ended before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    """Exit once this process is re-parented (where PR_SET_PDEATHSIG does not exist; needs the GIL)."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)
