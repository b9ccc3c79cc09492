"""VerifierPool on CPU: input order, per-item timeouts and crashes enforced from outside, clean shutdown."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import psutil
import pytest

from rlkit.reward import Score, VerifierPool, score_one
from rlkit.reward.pool_worker import OWN_DEADLINE_MARGIN_S
from rlkit.reward.verifier_options import check_options

BEHAVE = "verifier_fixtures:behave"  # tests/verifier_fixtures.py; its response text picks a failure mode


@pytest.fixture(scope="module", autouse=True)
def fixtures_importable():
    """Make tests/verifier_fixtures.py importable by name here and (via sys.path) in the workers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(Path(__file__).parent))
        yield


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _assert_gone(pids: set[int]) -> None:
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"worker processes still alive: {alive}"


@pytest.fixture(scope="module")
def math_pool():
    with VerifierPool("math", num_workers=2, timeout_s=2.0) as pool:
        yield pool


def _math_items(n: int) -> tuple[list[str], list[str]]:
    responses, references = [], []
    for i in range(n):
        forms = [f"\\boxed{{{i}}}", f"so \\boxed{{\\frac{{{2 * i}}}{{2}}}}", f"the answer is {i + 1}", "no answer"]
        responses.append(forms[i % 4])
        references.append(str(i))
    return responses, references


def test_math_pool_matches_in_process_scoring_in_input_order(math_pool):
    responses, references = _math_items(60)
    results = math_pool.score(responses, references)
    assert results == [score_one("math", r, g) for r, g in zip(responses, references)]
    # forms 0 and 1 are right, form 2 is off by one, form 3 has no answer
    assert [s.reward for s in results[:8]] == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert results[3].error == "no_answer"
    assert [s.extracted for s in results[:3]] == ["0", "\\frac{2}{2}", "3"]


def test_math_pool_times_out_a_real_math_verify_hang(math_pool):
    before = dict(math_pool.stats)
    # sympy evaluates 9^(9^9) exactly: math-verify runs for minutes without an outside timeout (inside a root,
    # since bare arithmetic on literals is refused before math-verify sees it)
    start = time.monotonic()
    results = math_pool.score(["\\boxed{\\sqrt{9^{9^{9}}}}", "\\boxed{2}"], ["2", "2"])
    assert time.monotonic() - start < 2.0 + 3.0  # the 2 s item timeout plus kill and bookkeeping
    assert results == [Score(None, False, None, "timeout"), Score(1.0, True, "2", None)]
    delta = {k: math_pool.stats[k] - before[k] for k in before}
    assert delta == dict(scored=1, unscorable=1, timeouts=1, crashes=0, restarts=1)
    assert math_pool.score(["\\boxed{3}"], ["3"])[0].reward == 1.0  # the replacement works


def test_order_preserved_with_two_workers():
    with VerifierPool(BEHAVE, num_workers=2, timeout_s=5.0) as pool:
        responses = [str(i) for i in range(300)]
        references = [str(i) if i % 3 else "other" for i in range(300)]
        results = pool.score(responses, references)
        assert [s.extracted for s in results] == responses
        assert [s.reward for s in results] == [0.0 if i % 3 == 0 else 1.0 for i in range(300)]
        assert pool.stats == dict(scored=300, unscorable=0, timeouts=0, crashes=0, restarts=0)
        assert pool.score([], []) == []


def test_hung_items_time_out_alone_and_pool_keeps_working():
    with VerifierPool(BEHAVE, num_workers=2, timeout_s=1.0) as pool:
        results = pool.score(["a", "hang", "b", "hang_ignoring_sigterm", "c"], ["a", "x", "x", "x", "c"])
        timeout = Score(None, False, None, "timeout")
        assert results == [
            Score(1.0, True, "a", None),
            timeout,
            Score(0.0, False, "b", None),
            timeout,  # SIGTERM ignored: killed with SIGKILL
            Score(1.0, True, "c", None),
        ]
        assert pool.stats == dict(scored=3, unscorable=2, timeouts=2, crashes=0, restarts=2)
        assert pool.score(["d", "e"], ["d", "e"]) == [Score(1.0, True, "d", None), Score(1.0, True, "e", None)]


def test_crashed_workers_are_replaced_and_only_their_items_unscorable():
    with VerifierPool(BEHAVE, num_workers=2, timeout_s=5.0) as pool:
        results = pool.score(["a", "exit", "b", "segfault", "c"], ["a", "a", "b", "b", "x"])
        crash = Score(None, False, None, "worker_crash")
        assert results == [Score(1.0, True, "a", None), crash, Score(1.0, True, "b", None), crash, Score(0.0, False, "c", None)]
        assert pool.stats == dict(scored=3, unscorable=2, timeouts=0, crashes=2, restarts=2)
        assert pool.score(["d"], ["d"]) == [Score(1.0, True, "d", None)]


def test_verifier_exceptions_are_unscorable_without_restart():
    with VerifierPool(BEHAVE, num_workers=1, timeout_s=5.0) as pool:
        results = pool.score(["raise", "bad_return", "ok"], ["x", "x", "ok"])
        assert results[0] == Score(None, False, None, "verifier_error: ValueError: boom")
        assert results[1].reward is None and results[1].error.startswith("verifier_error: TypeError:")
        assert results[2] == Score(1.0, True, "ok", None)
        assert pool.stats == dict(scored=1, unscorable=2, timeouts=0, crashes=0, restarts=0)


def test_options_reach_the_workers():
    with VerifierPool("verifier_fixtures:with_option", num_workers=1, options={"scale": 0.25}) as pool:
        assert pool.score(["x"], ["y"])[0].reward == 0.25


def test_worker_killed_while_idle_is_replaced_without_blaming_an_item():
    baseline = _children()
    with VerifierPool(BEHAVE, num_workers=1, timeout_s=5.0) as pool:
        assert pool.score(["a"], ["a"])[0].reward == 1.0
        (pid,) = _children() - baseline
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(5)
        assert pool.score(["b"], ["b"]) == [Score(1.0, True, "b", None)]
        assert pool.stats == dict(scored=2, unscorable=0, timeouts=0, crashes=0, restarts=1)


def test_close_leaves_no_child_processes_and_is_idempotent():
    baseline = _children()
    pool = VerifierPool(BEHAVE, num_workers=2, timeout_s=5.0)
    pool.score(["a"], ["a"])
    pids = _children() - baseline
    assert len(pids) == 2
    pool.close()
    pool.close()
    _assert_gone(pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["a"], ["a"])


def test_close_before_workers_started_and_after_a_timeout():
    baseline = _children()
    with VerifierPool(BEHAVE, num_workers=2) as pool:
        pids = _children() - baseline  # still starting: never awaited
    _assert_gone(pids)
    with VerifierPool(BEHAVE, num_workers=1, timeout_s=0.5) as pool:
        pool.score(["hang"], ["x"])
        pids = _children() - baseline
    _assert_gone(pids)


def test_in_process_mode_scores_without_workers():
    baseline = _children()
    with VerifierPool("gsm8k", num_workers=0) as pool:
        assert _children() == baseline
        results = pool.score(["#### 18", "#### 17", "nothing"], ["18", "18", "18"])
        assert [s.reward for s in results] == [1.0, 0.0, 0.0]
        assert pool.stats == dict(scored=3, unscorable=0, timeouts=0, crashes=0, restarts=0)


def test_worker_that_fails_to_start_raises_and_closes_the_pool():
    baseline = _children()
    pool = VerifierPool("verifier_fixtures:broken_prepare", num_workers=1)
    with pytest.raises(RuntimeError, match="exited during start-up"):
        pool.score(["a"], ["a"])
    _assert_gone(_children() - baseline)
    with pytest.raises(RuntimeError, match="closed"):
        pool.score(["a"], ["a"])


def test_worker_that_never_starts_hits_the_startup_timeout():
    baseline = _children()
    with VerifierPool("verifier_fixtures:slow_prepare", num_workers=1, startup_timeout_s=0.5) as pool:
        with pytest.raises(RuntimeError, match="did not start within 0.5 s"):
            pool.score(["a"], ["a"])
    _assert_gone(_children() - baseline)


def test_invalid_construction_and_inputs_fail_clearly():
    with pytest.raises(KeyError, match="unknown verifier"):
        VerifierPool("no_such_verifier", num_workers=0)
    with pytest.raises(TypeError, match="cannot take options"):
        VerifierPool("math", num_workers=0, options={"no_such_option": 1})
    with pytest.raises(ValueError, match="num_workers"):
        VerifierPool("math", num_workers=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        VerifierPool("math", num_workers=0, timeout_s=0)
    with VerifierPool("gsm8k", num_workers=0) as pool:
        with pytest.raises(ValueError, match="2 responses but 1 references"):
            pool.score(["1", "2"], ["1"])
        with pytest.raises(TypeError, match=r"references\[1\] is int"):
            pool.score(["1", "2"], ["1", 2])
        with pytest.raises(TypeError, match="lists of strings"):
            pool.score("1", "1")


_PARENT = """
from rlkit.reward import VerifierPool
pool = VerifierPool("math", num_workers=1, timeout_s=600)
pool.score(["\\\\boxed{1}"], ["1"])  # the worker is up
print("scoring", flush=True)
pool.score(["\\\\boxed{\\\\sqrt{9^{9^{9^{9}}}}}"], ["1"])  # sympy computes this in one C call, holding the GIL
"""


def test_a_busy_worker_dies_with_its_killed_parent():
    """A SIGKILLed parent cannot stop its workers: they must end themselves, even mid-item."""
    path = os.pathsep.join([str(Path(__file__).parent), *sys.path])
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], env=dict(os.environ, PYTHONPATH=path),
                              stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        assert parent.stdout.readline() == "scoring\n"
        workers = psutil.Process(parent.pid).children()
        assert len(workers) == 1
        time.sleep(0.3)  # the worker is inside the item: it reads nothing, and no Python thread of it runs
        parent.kill()
        parent.wait()
        _, alive = psutil.wait_procs(workers, timeout=3)
        assert not alive, "the worker outlived its killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for worker in workers:  # only if the test failed
            if worker.is_running():
                worker.kill()


def test_a_worker_ends_itself_once_an_item_overruns_its_own_deadline():
    """Second line of defence: without the parent's timeout, the worker's own SIGALRM ends it."""
    with VerifierPool(BEHAVE, num_workers=1, timeout_s=0.5) as pool:
        pool.score(["a"], ["a"])
        worker = pool._workers[0]  # bypass the parent's timeout: hand it an item and never watch it
        worker.conn.send(("hang", "x"))
        start = time.monotonic()
        assert worker.process.wait(10) == -signal.SIGALRM
        assert 0.5 < time.monotonic() - start < 0.5 + OWN_DEADLINE_MARGIN_S + 2.0


def _typed(response: str, reference: str, *, flag: bool = True, digits: int | None = None, scale: float = 1.0,
           mode: Literal["latex", "expr"] = "latex", targets: tuple[str, ...] = (), untyped=None,
           table: dict | None = None) -> Score:
    return Score(1.0, True, response, None)


@pytest.mark.parametrize("options", [
    {}, {"flag": False}, {"digits": 3}, {"digits": None}, {"scale": 2}, {"scale": 0.5}, {"mode": "expr"},
    {"targets": ["latex", "expr"]}, {"targets": ()},
])
def test_option_values_of_the_declared_type_pass(options):
    check_options("typed", _typed, options)


@pytest.mark.parametrize("options, message", [
    ({"flag": 1}, "options.flag: verifier 'typed' expects bool, got int 1. Fix: give a value of type bool, "
                  "or leave it out for the default True"),
    ({"flag": [1, 2]}, "expects bool, got list [1, 2]"),
    ({"digits": True}, "expects int | None, got bool True"),  # bool is not an int here
    ({"digits": 2.0}, "expects int | None, got float 2.0"),
    ({"scale": float("inf")}, "expects float, got float inf"),
    ({"scale": float("nan")}, "expects float, got float nan"),
    ({"scale": 10**400}, "expects float, got int 1000"),
    ({"mode": "LATEX"}, "expects Literal['latex', 'expr'], got str 'LATEX'"),
    ({"targets": "latex"}, "expects tuple[str, ...], got str 'latex'"),
    ({"targets": ["latex", 3]}, "expects tuple[str, ...], got list ['latex', 3]"),
    ({"untyped": 1}, "options.untyped: verifier 'typed' declares no type for this option, which rlkit cannot check. "
                     "Fix: annotate"),
    ({"table": {}}, "declares type dict | None for this option"),
    ({"flgs": True}, "cannot take options ['flgs']"),
])
def test_option_values_of_another_type_are_refused_naming_option_and_types(options, message):
    with pytest.raises(TypeError) as err:
        check_options("typed", _typed, options)
    assert message in str(err.value)


def test_verifier_pool_refuses_an_option_of_the_wrong_type_before_starting_workers():
    baseline = _children()
    with pytest.raises(TypeError, match="options.fallback_last_number: verifier 'math' expects bool, got str 'no'"):
        VerifierPool("math", num_workers=2, options={"fallback_last_number": "no"})
    assert _children() == baseline
