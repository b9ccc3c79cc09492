"""User verifiers for the reward tests, loaded by import path ("verifier_fixtures:behave").

``behave`` misbehaves on command: the response text selects hanging, dying or raising,
so one pool can meet every failure mode; any other response is scored by equality.
"""
import ctypes
import os
import signal
import time

from rlkit.reward import Score


def behave(response: str, reference: str) -> Score:
    if response == "hang":
        time.sleep(3600)
    if response == "hang_ignoring_sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only SIGKILL ends it
        time.sleep(3600)
    if response == "exit":
        os._exit(3)
    if response == "segfault":
        ctypes.string_at(0)
    if response == "raise":
        raise ValueError("boom")
    if response == "bad_return":
        return 0.5
    correct = response == reference
    return Score(1.0 if correct else 0.0, correct, response, None)


def _fail_to_prepare() -> None:
    raise RuntimeError("cannot load this verifier's model")


def broken_prepare(response: str, reference: str) -> Score:
    return Score(1.0, True, response, None)


broken_prepare.prepare = _fail_to_prepare


def slow_prepare(response: str, reference: str) -> Score:
    return Score(1.0, True, response, None)


slow_prepare.prepare = lambda: time.sleep(3600)


def with_option(response: str, reference: str, *, scale: float = 1.0) -> Score:
    return Score(scale, True, response, None)
