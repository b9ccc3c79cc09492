"""Verifier-reward service on CPU: HTTP scoring equals in-process scoring; hostile input, faults,
restarts, auth and shutdown are each answered cleanly while the service keeps serving."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from rlkit.reward import Score, score_one
from rlkit.reward.client import RewardClient, RewardServiceError
from rlkit.reward.serve import build_server, parse_args, settings_from_args
from rlkit.reward.service import LOOPBACK_HOSTS, ServiceSettings

TESTS = Path(__file__).parent
BEHAVE = "verifier_fixtures:behave"  # tests/verifier_fixtures.py: the response text picks a failure mode
# Per-item timeout of the services that meet hangs. The service for right and wrong answers keeps a long one:
# a cold worker's first math items spend up to a second in sympy's lazy imports on a loaded machine.
TIMEOUT_S = 1.5


@pytest.fixture(scope="module", autouse=True)
def fixtures_importable():
    """tests/verifier_fixtures.py importable here and (via sys.path -> PYTHONPATH) in the workers."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(TESTS))
        yield


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


class _Service:
    """The service on loopback (port 0: an ephemeral one), run by uvicorn in a thread."""

    def __init__(self, settings: ServiceSettings, *, grace_s: float = 5.0, port: int = 0, **server_options):
        self.server = build_server(settings, port=port, grace_s=grace_s, log_level="warning", **server_options)
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self._thread.is_alive() and time.monotonic() < deadline, "service did not start"
            time.sleep(0.01)
        self.port = self.server.port
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)
        assert not self._thread.is_alive(), "service did not shut down"


@contextmanager
def running(settings: ServiceSettings, *, check_workers: bool = True, **kwargs):
    """Yields (url, server) of a running service; stops it after, and (unless another service may be
    starting workers meanwhile) asserts that none of the workers started during its life outlives it."""
    before = _children()
    service = _Service(settings, **kwargs)
    try:
        yield service.url, service.server
    finally:
        workers = _children() - before
        service.stop()
        if check_workers:
            assert not _alive(workers), "worker processes outlived the service"


@pytest.fixture(scope="module")
def no_orphans():
    """Every worker started by this module's long-lived services is gone once they stop."""
    before = _children()
    yield
    assert not _alive(_children() - before), "worker processes outlived the services"


@pytest.fixture(scope="module")
def service(no_orphans):
    settings = ServiceSettings(workers=2, timeout_s=30.0, extra_verifiers=(BEHAVE,), max_items=1000,
                               max_chars=1_500_000, max_request_bytes=3 * 2**20, preload=("math",))
    with running(settings, check_workers=False) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def fast(no_orphans):
    """One worker per verifier and a short item timeout: for hangs."""
    settings = ServiceSettings(workers=1, timeout_s=TIMEOUT_S, extra_verifiers=(BEHAVE,))
    with running(settings, check_workers=False) as (url, server):
        yield url, server


def _post(url: str, body, headers=None, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(f"{url}/score", content=content, headers=headers, timeout=30, **kwargs)


def _metric(url: str, line_start: str, headers=None) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start + " ")]
    return values[0] if values else 0.0


def _assert_serving(url: str) -> None:
    answer = _post(url, {"verifier": BEHAVE, "items": [{"response": "ok", "reference": "ok"}]})
    assert answer.status_code == 200
    assert answer.json()["results"] == [dict(reward=1.0, correct=True, extracted="ok", error=None)]


# --------------------------------------------------------------------------- functional

MATH_CASES = [  # (response, reference, expected reward); None: unscorable
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),  # fraction vs decimal
    ("\\boxed{\\frac{2}{4}}", "\\tfrac12", 1.0),
    ("\\boxed{\\sqrt{8}}", "2\\sqrt2", 1.0),  # sqrt
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),
    ("\\boxed{(-\\infty, 3)}", "(-\\infty,3)", 1.0),  # interval
    ("\\boxed{[0,1)}", "[0,1]", 0.0),  # interval ends matter
    ("\\boxed{\\{3,1,2\\}}", "\\{1,2,3\\}", 1.0),  # set, any order
    ("\\boxed{5\\text{ cm}}", "5", 1.0),  # unit
    ("\\boxed{12\\%}", "12", 1.0),  # percentage
    ("\\boxed{0.12}", "12\\%", 0.0),
    ("\\boxed{1,234,567}", "1234567", 1.0),  # thousands separators
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("the answer is 42", "42", 1.0),  # no box: last number
    ("no answer at all", "3", 0.0),  # scorable: no_answer
    ("\\boxed{3}", "", None),  # bad reference
    ("\\boxed{3}", "\\boxed{}", None),
]
GSM8K_CASES = [
    ("9 * 2 = 18\n#### 18", "Janet sells 9 eggs.\n#### 18", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("so \\boxed{\\$18.00}", "18", 1.0),
    ("#### 50%", "50", 1.0),
    ("so 7 apples", "#### 8", 0.0),
    ("nothing", "#### 8", 0.0),
    ("#### 3", "three", None),
]


@pytest.mark.parametrize("verifier, cases", [("math", MATH_CASES), ("gsm8k", GSM8K_CASES)])
def test_scores_over_http_equal_in_process_scores(service, verifier, cases):
    url, _ = service
    responses, references, expected = map(list, zip(*cases))
    in_process = [score_one(verifier, r, g) for r, g in zip(responses, references)]
    with RewardClient(url, verifier=verifier) as client:
        scores = client.score(responses, references)
    assert scores == in_process
    assert [s.reward for s in scores] == expected
    assert [s.error for s in scores if s.reward is None] == ["bad_reference"] * expected.count(None)


def test_client_batches_in_order_and_mixes_verifiers_per_item(service):
    url, _ = service
    responses = [str(i) for i in range(50)]
    references = [str(i) if i % 3 else "other" for i in range(50)]
    with RewardClient(url, verifier=BEHAVE, batch_size=7) as client:
        scores = client.score(responses, references)
        assert client.score([], []) == []
    assert [s.extracted for s in scores] == responses
    assert [s.reward for s in scores] == [0.0 if i % 3 == 0 else 1.0 for i in range(50)]
    assert client.stats["batches"] == 8 and client.stats["items"] == 50 and client.stats["retries"] == 0
    # items may name their own verifier; the top-level one is the default
    body = {"verifier": BEHAVE, "items": [{"response": "7", "reference": "7"},
                                          {"response": "#### 7", "reference": "7", "verifier": "gsm8k"}]}
    assert [r["reward"] for r in _post(url, body).json()["results"]] == [1.0, 1.0]


def test_client_checks_its_inputs_like_verifier_pool(service):
    url, _ = service
    with RewardClient(url, verifier="math") as client:
        with pytest.raises(TypeError, match="lists of strings"):
            client.score("\\boxed{1}", "1")
        with pytest.raises(ValueError, match="2 responses but 1 references"):
            client.score(["a", "b"], ["a"])
        with pytest.raises(TypeError, match=r"responses\[1\] is int"):
            client.score(["a", 3], ["a", "b"])


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "body, status, detail",
    [
        (b"{not json", 400, "malformed JSON"),
        (b"", 400, "empty request body"),
        (b'{"items": [{"response": "\xff\xfe", "reference": "1"}], "verifier": "math"}', 400, "not valid UTF-8"),
        (b"[" * 100_000, 400, "malformed JSON"),  # nested too deeply
        (b'{"verifier": "math", "items": [], "options": {"x": NaN}}', 400, "NaN is not valid JSON"),
        ([1, 2], 422, "must be a JSON object"),
        ({"verifier": "math"}, 422, 'no "items"'),
        ({"verifier": "math", "items": "x"}, 422, '"items" must be an array, got string'),
        ({"verifier": "math", "items": [3]}, 422, "items[0] must be an object"),
        ({"verifier": "math", "items": [{"response": 1, "reference": "2"}]}, 422,
         "items[0].response must be a string, got number"),
        ({"verifier": "math", "items": [{"response": "1", "reference": None}]}, 422,
         "items[0].reference must be a string, got null"),
        ({"verifier": "math", "items": [{"response": "1"}]}, 422, 'items[0] has no "reference"'),
        ({"verifier": "math", "items": [{"respone": "1", "reference": "1"}]}, 422, "unknown field(s) ['respone']"),
        ({"items": [{"response": "1", "reference": "1"}]}, 422, "names no verifier"),
        ({"verifier": 5, "items": []}, 422, '"verifier" must be a string'),
        ({"verifier": "nope", "items": []}, 422, "unknown verifier 'nope'"),
        # an import path not allowed at start-up is refused: it would run arbitrary code
        ({"verifier": "os:execlp", "items": [{"response": "reboot", "reference": "x"}]}, 422, "unknown verifier"),
        ({"verifier": "math", "options": {"bogus": 1}, "items": []}, 422, "cannot take options ['bogus']"),
        ({"verifier": "math", "options": [], "items": []}, 422, '"options" must be an object'),
        ({"verifier": BEHAVE, "items": [{"response": "x" * 1_600_000, "reference": "1"}]}, 413,
         "1600000 characters; the limit is 1500000"),
        ({"verifier": BEHAVE, "items": [{"response": "", "reference": ""}] * 5000}, 413,
         "5000 items in one request; the limit is 1000"),
        ({"verifier": BEHAVE, "items": [{"response": "x" * 1_000_000, "reference": "1"}] * 4}, 413,
         "exceeds 3145728 bytes"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem_and_service_keeps_serving(service, body, status, detail):
    url, _ = service
    answer = _post(url, body)
    assert answer.status_code == status
    assert detail in answer.json()["detail"]
    assert "results" not in answer.json()
    _assert_serving(url)


def test_empty_huge_and_odd_texts_are_scored(service):
    url, _ = service
    responses = ["", "x" * 1_000_000 + " \\boxed{3}", "\\boxed{\ud800}", "\\boxed{" * 10_000 + "3" + "}" * 10_000]
    references = ["3", "3", "1", "3"]
    with RewardClient(url, verifier="math") as client:
        scores = client.score(responses, references)
    assert scores == [score_one("math", r, g) for r, g in zip(responses, references)]
    assert [s.reward for s in scores[:2]] == [0.0, 1.0]
    assert scores[0].error == "no_answer"


def test_sympy_hang_times_out_alone_and_worker_is_replaced(fast):
    url, _ = fast
    timeouts, restarts = (_metric(url, f'rlkit_reward_{name}_total{{verifier="math"}}')
                          for name in ("timeouts", "worker_restarts"))
    start = time.monotonic()
    hang = {"response": "\\boxed{\\sqrt{9^{9^{9^{9}}}}}", "reference": "1", "verifier": "math"}
    fine = [{"response": str(i), "reference": "1", "verifier": BEHAVE} for i in range(2)]
    # sympy would evaluate 9^(9^(9^9)) for hours: only the outside timeout ends it
    answer = _post(url, {"items": [fine[0], hang, fine[1]]})
    assert time.monotonic() - start < TIMEOUT_S + 10  # + the math worker's start-up
    assert answer.json()["results"] == [dict(reward=0.0, correct=False, extracted="0", error=None),
                                        dict(reward=None, correct=False, extracted=None, error="timeout"),
                                        dict(reward=1.0, correct=True, extracted="1", error=None)]
    assert _metric(url, 'rlkit_reward_timeouts_total{verifier="math"}') == timeouts + 1
    assert _metric(url, 'rlkit_reward_worker_restarts_total{verifier="math"}') == restarts + 1
    _assert_serving(url)


def test_misbehaving_verifier_items_are_unscorable_alone(fast):
    url, _ = fast
    responses = ["exit", "segfault", "raise", "bad_return", "hang", "fine"]
    with RewardClient(url, verifier=BEHAVE) as client:
        scores = client.score(responses, ["fine"] * len(responses))
    errors = [s.error for s in scores]
    assert errors[:2] == ["worker_crash", "worker_crash"]
    assert errors[2] == "verifier_error: ValueError: boom"
    assert errors[3].startswith("verifier_error: TypeError: verifier 'verifier_fixtures:behave' returned float")
    assert errors[4] == "timeout"
    assert scores[5] == Score(1.0, True, "fine", None)
    assert all(s.reward is None for s in scores[:5])
    _assert_serving(url)


def test_a_client_that_gives_up_frees_its_queued_items(fast):
    url, _ = fast
    _assert_serving(url)  # the one worker is up
    restarts = f'rlkit_reward_worker_restarts_total{{verifier="{BEHAVE}"}}'
    before = {name: _metric(url, name) for name in (restarts, "rlkit_reward_items_cancelled_total")}
    items = [{"response": "hang", "reference": "a"}] * 3
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/score", json={"verifier": BEHAVE, "items": items}, timeout=0.5)
    _wait_for(url, "rlkit_reward_inflight_requests", 0)  # given up as soon as the client left
    assert _metric(url, 'rlkit_reward_requests_total{code="499"}') >= 1
    _assert_serving(url)  # after the first hang's timeout, not after all three
    assert _metric(url, "rlkit_reward_items_cancelled_total") == before["rlkit_reward_items_cancelled_total"] + 3
    assert _metric(url, restarts) == before[restarts] + 1  # only the hang already running was scored


def test_a_hung_item_holds_back_only_its_own_request():
    with running(ServiceSettings(workers=2, timeout_s=2.0, extra_verifiers=(BEHAVE,))) as (url, _):
        _assert_serving(url)  # workers started
        with RewardClient(url, verifier=BEHAVE) as client:
            slow = threading.Thread(target=client.score, args=(["hang"], ["x"]))
            slow.start()
            _wait_for(url, "rlkit_reward_inflight_requests", 1)  # the hang occupies one of the two workers
            scores = client.score([str(i) for i in range(5)], [str(i) for i in range(5)])
            # the other worker served them while the hang waits for its timeout
            assert slow.is_alive()
            slow.join()
        assert all(s.reward == 1.0 for s in scores)


def _wait_for(url: str, metric: str, value: float, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _metric(url, metric) != value:
        assert time.monotonic() < deadline, f"{metric} never reached {value}"
        time.sleep(0.02)


def test_metrics_are_prometheus_text(service):
    url, _ = service
    _assert_serving(url)
    text = httpx.get(f"{url}/metrics").text
    assert '# TYPE rlkit_reward_request_seconds histogram' in text
    assert 'rlkit_reward_requests_total{code="200"}' in text
    assert f'rlkit_reward_items_total{{verifier="{BEHAVE}",outcome="scored"}}' in text
    count = _metric(url, "rlkit_reward_request_seconds_count")
    assert _metric(url, 'rlkit_reward_request_seconds_bucket{le="+Inf"}') == count > 0
    ready = httpx.get(f"{url}/ready").json()
    assert ready["status"] == "ready" and {"verifier": "math", "options": {}, "workers": 2} in ready["pools"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


# --------------------------------------------------------------------------- limits, auth, faults


def test_queue_limit():
    settings = ServiceSettings(workers=1, timeout_s=TIMEOUT_S, max_queued_items=3, max_items=3,
                               extra_verifiers=(BEHAVE,))
    two = [{"response": "a", "reference": "a"}] * 2
    with running(settings) as (url, _):
        hanging = threading.Thread(target=_post, args=(url, {"verifier": BEHAVE, "items": [
            {"response": "hang", "reference": "a"}, {"response": "a", "reference": "a"}]}))
        hanging.start()
        _wait_for(url, "rlkit_reward_queued_items", 2)
        answer = _post(url, {"verifier": BEHAVE, "items": two})  # 2 + 2 > 3 queued
        assert answer.status_code == 503 and "busy" in answer.json()["detail"]
        assert answer.headers["retry-after"] == "1"
        with RewardClient(url, verifier=BEHAVE, retries=1, backoff_s=0.01, max_backoff_s=0.05) as client:
            with pytest.raises(RewardServiceError, match="2 attempt.*HTTP 503.*busy"):  # 5xx: retried, then raised
                client.score(["a"] * 2, ["a"] * 2)
        hanging.join()
        assert _post(url, {"verifier": BEHAVE, "items": two}).status_code == 200  # room again


def test_idle_pools_are_evicted_least_recently_used_first():
    option = "verifier_fixtures:with_option"
    settings = ServiceSettings(workers=1, timeout_s=TIMEOUT_S, max_pools=2, extra_verifiers=(BEHAVE, option))
    with running(settings) as (url, _):
        before = _children()
        for scale in (1.0, 2.0, 3.0, 2.0, 4.0):  # 3 evicts 1; 2 is used again, so 4 evicts 3 (LRU, not FIFO)
            answer = _post(url, {"verifier": option, "options": {"scale": scale}, "items": [{"response": "a",
                                                                                             "reference": "a"}]})
            assert answer.status_code == 200 and answer.json()["results"][0]["reward"] == scale
        assert [pool["options"] for pool in httpx.get(f"{url}/ready").json()["pools"]] == [{"scale": 2.0},
                                                                                           {"scale": 4.0}]
        deadline = time.monotonic() + 10
        while len(_alive(_children() - before)) > 2:  # evicted pools' workers exit in the background
            assert time.monotonic() < deadline, "evicted pools' workers are still alive"
            time.sleep(0.05)
        # pools that are scoring are never evicted: one request holding both (a hang and scale 7) makes a
        # third configuration wait (503, retried by clients)
        held = threading.Thread(target=_post, args=(url, {"items": [
            {"response": "hang", "reference": "a", "verifier": BEHAVE},
            {"response": "a", "reference": "a", "verifier": option, "options": {"scale": 7.0}}]}))
        held.start()
        _wait_for(url, "rlkit_reward_inflight_requests", 1)
        answer = _post(url, {"verifier": option, "options": {"scale": 9.0}, "items": []})
        assert answer.status_code == 503 and "are scoring; retry shortly" in answer.json()["detail"]
        held.join()
        many = [{"response": "a", "reference": "a", "options": {"scale": float(i)}} for i in range(3)]
        answer = _post(url, {"verifier": option, "items": many})
        assert answer.status_code == 422 and "more than 2 (verifier, options) configurations" in answer.json()["detail"]


def test_settings_refuse_limits_that_cannot_work():
    with pytest.raises(ValueError, match="max_queued_items \\(10\\) must be >= max_items \\(20\\)"):
        ServiceSettings(max_queued_items=10, max_items=20)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        ServiceSettings(workers=0)
    with pytest.raises(KeyError, match="cannot import verifier 'no_such_module:fn'"):
        ServiceSettings(extra_verifiers=("no_such_module:fn",))
    with pytest.raises(ValueError, match="printable ASCII"):
        ServiceSettings(token="caf\u00e9")


def test_bearer_token_required_and_never_answered_with_scores():
    settings = ServiceSettings(workers=1, timeout_s=TIMEOUT_S, token="s3cret-token", extra_verifiers=(BEHAVE,))
    body = {"verifier": BEHAVE, "items": [{"response": "a", "reference": "a"}]}
    with running(settings) as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            answer = _post(url, body, headers=headers)
            assert answer.status_code == 401 and "results" not in answer.json()
            assert answer.headers["www-authenticate"] == "Bearer"
            assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no token
        with RewardClient(url, verifier=BEHAVE, token="wrong") as client:
            with pytest.raises(RewardServiceError, match="HTTP 401.*token"):
                client.score(["a"], ["a"])
            assert client.stats["retries"] == 0  # a 4xx is not retried
        with RewardClient(url, verifier=BEHAVE, token="s3cret-token") as client:
            client.check()
            assert client.score(["a"], ["a"]) == [Score(1.0, True, "a", None)]
        assert _metric(url, 'rlkit_reward_requests_total{code="401"}', {"Authorization": "Bearer s3cret-token"}) == 4


def test_client_check_reports_an_unknown_verifier_at_once(service):
    url, _ = service
    with RewardClient(url, verifier="maths") as client:
        with pytest.raises(RewardServiceError, match="HTTP 422.*unknown verifier 'maths'.*gsm8k, math"):
            client.check()
        assert client.stats["retries"] == 0


def test_worker_killed_mid_batch():
    settings = ServiceSettings(workers=2, timeout_s=3.0, extra_verifiers=(BEHAVE,))
    with running(settings) as (url, _):
        before = _children()
        _assert_serving(url)  # starts the two workers
        workers = sorted(_children() - before)
        assert len(workers) == 2
        result = {}
        with RewardClient(url, verifier=BEHAVE) as client:
            batch = threading.Thread(target=lambda: result.update(
                scores=client.score(["hang", "hang", "a", "b"], ["a", "a", "a", "b"])))
            batch.start()
            _wait_for(url, "rlkit_reward_inflight_requests", 1)
            time.sleep(0.5)  # both workers are on a "hang"
            os.kill(workers[0], signal.SIGKILL)
            batch.join()
        scores = result["scores"]
        assert sorted(s.error for s in scores[:2]) == ["timeout", "worker_crash"]
        assert scores[2:] == [Score(1.0, True, "a", None), Score(1.0, True, "b", None)]
        _assert_serving(url)


def test_verifier_that_cannot_start_gives_5xx_then_a_clear_client_error():
    settings = ServiceSettings(workers=1, timeout_s=TIMEOUT_S, extra_verifiers=("verifier_fixtures:broken_prepare",))
    with running(settings) as (url, _):
        client = RewardClient(url, verifier="verifier_fixtures:broken_prepare", retries=1, backoff_s=0.01)
        with pytest.raises(RewardServiceError, match=r"2 attempt.*HTTP 500.*could not start its workers"):
            client.score(["a"], ["a"])
        assert client.stats["retries"] == 1
        client.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_service_down_raises_a_clear_error_after_retries():
    url = f"http://127.0.0.1:{_free_port()}"
    with RewardClient(url, verifier="math", retries=2, backoff_s=0.01) as client:
        with pytest.raises(RewardServiceError) as err:
            client.score(["\\boxed{1}"], ["1"])
    message = str(err.value)
    assert url in message and "3 attempt(s)" in message and "ConnectError" in message
    assert "python -m rlkit.reward.serve" in message and "reward.url" in message


def test_client_retries_through_a_restarted_service():
    settings = ServiceSettings(workers=1, timeout_s=TIMEOUT_S, extra_verifiers=(BEHAVE,))
    before = _children()
    first, restarted = _Service(settings), []
    client = RewardClient(first.url, verifier=BEHAVE, retries=100, backoff_s=0.05, max_backoff_s=0.2)
    comeback = threading.Timer(0.5, lambda: restarted.append(_Service(settings, port=first.port)))
    try:
        assert client.score(["a"], ["a"])[0].reward == 1.0
        first.stop()
        comeback.start()  # the service comes back on the same port while the client is retrying
        assert client.score(["b", "c"], ["b", "x"]) == [Score(1.0, True, "b", None), Score(0.0, False, "c", None)]
        assert client.stats["retries"] >= 1
    finally:
        comeback.cancel()
        if comeback.is_alive():
            comeback.join()
        for service in restarted:
            service.stop()
        client.close()
    assert not _alive(_children() - before), "worker processes outlived the services"


def test_sigterm_answers_in_flight_requests_and_stops_every_worker():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "rlkit.reward.serve", "--port", str(port), "--workers", "2", "--timeout-s", "2",
               "--grace-s", "0.2", "--verifier", BEHAVE, "--log-level", "warning"]
    service = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path])))
    try:
        with RewardClient(url, verifier=BEHAVE, retries=200, backoff_s=0.05, max_backoff_s=0.2) as client:
            assert client.score(["a"], ["a"])[0].reward == 1.0  # retried until the service is up
        workers = [child.pid for child in psutil.Process(service.pid).children()]
        assert len(workers) == 2
        answers = []
        in_flight = threading.Thread(target=lambda: answers.append(_post(url, {
            "verifier": BEHAVE, "items": [{"response": "hang", "reference": "x"}]})))
        in_flight.start()
        _wait_for(url, "rlkit_reward_inflight_requests", 1)
        service.send_signal(signal.SIGTERM)
        in_flight.join(10)
        # the hang outlasts the 0.2 s grace: answered 503, not left hanging
        assert answers[0].status_code == 503 and "shutting down" in answers[0].json()["detail"]
        service.wait(10)
        assert not _alive(workers)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


# --------------------------------------------------------------------------- slow and hostile clients


def _stall(port: int, request: bytes) -> socket.socket:
    """A connection that sends ``request`` and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(request)
    return sock


def _closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


STALLED_BODY = (b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{")


def test_stalled_connections_are_closed_and_health_keeps_answering():
    settings = ServiceSettings(workers=1, timeout_s=TIMEOUT_S, extra_verifiers=(BEHAVE,))
    with running(settings, read_timeout_s=1.5, max_connections=64) as (url, server):
        port = int(url.rsplit(":", 1)[1])
        stalled = [_stall(port, STALLED_BODY) for _ in range(300)]  # headers and "{", then nothing
        stalled += [_stall(port, b"GET /health HTTP/1.1\r\nHo"), _stall(port, b"")]  # half a header; nothing
        try:
            start = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert time.monotonic() - start < 1.0
            _assert_serving(url)
            # past --read-timeout-s every stalled connection is gone, the newest included
            assert all(_closed_by_server(sock, 5.0) for sock in stalled[-66:])
        finally:
            for sock in stalled:
                sock.close()
        codes = {code: _metric(url, f'rlkit_reward_requests_total{{code="{code}"}}') for code in (408, 500, 503)}
        assert codes[500] == 0 and codes[408] >= 1 and codes[503] >= 300 - 64  # made room / timed out
        assert len(server.server_state.connections) <= 2  # only the metrics probes' own


def test_client_disconnect_is_one_log_line_not_an_error(caplog):
    settings = ServiceSettings(workers=1, timeout_s=TIMEOUT_S, extra_verifiers=(BEHAVE,))
    with running(settings) as (url, _):
        errors = logging.getLogger("uvicorn.error")  # uvicorn's loggers do not propagate to pytest's handler
        errors.addHandler(caplog.handler)
        try:
            with caplog.at_level(logging.INFO, logger="rlkit.reward"):
                sock = _stall(int(url.rsplit(":", 1)[1]), STALLED_BODY)
                time.sleep(0.2)  # the app is reading the body
                sock.close()
                _wait_for(url, 'rlkit_reward_requests_total{code="499"}', 1)
        finally:
            errors.removeHandler(caplog.handler)
        lines = [r for r in caplog.records if r.name.startswith(("rlkit", "uvicorn"))]
        assert [(r.levelname, r.getMessage().split(" from ")[0]) for r in lines] == [("INFO", "request")]
        assert "ended before its body arrived: the client closed the connection" in lines[0].getMessage()
        assert "\n" not in lines[0].getMessage() and lines[0].exc_info is None
        assert _metric(url, 'rlkit_reward_requests_total{code="500"}') == 0
        _assert_serving(url)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_score_requires_a_json_content_type(service, content_type):
    url, _ = service
    body = json.dumps({"verifier": BEHAVE, "items": [{"response": "a", "reference": "a"}]}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    answer = httpx.post(f"{url}/score", content=body, headers=headers, timeout=30)
    assert answer.status_code == 415
    assert "Content-Type must be application/json" in answer.json()["detail"]
    answer = httpx.post(f"{url}/score", content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert answer.status_code == 200


def test_loopback_service_refuses_other_host_names():
    assert settings_from_args(parse_args(["--host", "127.0.0.1"])).allowed_hosts == LOOPBACK_HOSTS
    assert settings_from_args(parse_args(["--host", "0.0.0.0"])).allowed_hosts == ()
    settings = ServiceSettings(workers=1, extra_verifiers=(BEHAVE,), allowed_hosts=LOOPBACK_HOSTS)
    body = {"verifier": BEHAVE, "items": [{"response": "a", "reference": "a"}]}
    with running(settings) as (url, _):
        port = url.rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):  # DNS rebinding
            answer = _post(url, body, headers={"Host": host})
            assert answer.status_code == 403 and "DNS rebinding" in answer.json()["detail"]
            assert httpx.get(f"{url}/metrics", headers={"Host": host}).status_code == 403
        for host in (f"127.0.0.1:{port}", f"LOCALHOST:{port}", "[::1]"):
            assert _post(url, body, headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("body, detail", [
    (b'{"verifier": "math", "items": [], "options": {"fallback_last_number": [1, 2]}}', "got list [1, 2]"),
    (b'{"verifier": "math", "items": [], "options": {"fallback_last_number": 1e999}}', "got float inf"),
    (b'{"verifier": "math", "items": [], "options": {"fallback_last_number": 2}}', "got int 2"),
    (b'{"verifier": "math", "items": [], "options": {"fallback_last_number": "yes"}}', "got str 'yes'"),
    (b'{"verifier": "math", "items": [{"response": "1", "reference": "1", "options": '
     b'{"fallback_last_number": null}}]}', "items[0]: options.fallback_last_number: verifier 'math' expects bool, "
                                          "got None None"),
])
def test_option_values_of_the_wrong_type_are_refused_before_any_pool_starts(service, body, detail):
    url, _ = service
    pools = _metric(url, "rlkit_reward_pools")
    answer = _post(url, body)
    assert answer.status_code == 422
    assert "options.fallback_last_number: verifier 'math' expects bool" in answer.json()["detail"]
    assert detail in answer.json()["detail"]
    assert _metric(url, "rlkit_reward_pools") == pools


def test_sigterm_with_a_stalled_connection_exits_at_once_and_quietly():
    port = _free_port()
    command = [sys.executable, "-m", "rlkit.reward.serve", "--port", str(port), "--workers", "1", "--grace-s", "30",
               "--verifier", BEHAVE]
    service = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path])),
                               stderr=subprocess.PIPE, text=True)
    try:
        with RewardClient(f"http://127.0.0.1:{port}", verifier=BEHAVE, retries=200, backoff_s=0.05,
                          max_backoff_s=0.2) as client:
            assert client.score(["a"], ["a"])[0].reward == 1.0  # retried until the service is up
        sock = _stall(port, STALLED_BODY)
        time.sleep(0.2)
        start = time.monotonic()
        service.send_signal(signal.SIGTERM)
        _, log = service.communicate(timeout=10)
        took = time.monotonic() - start
        sock.close()
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
    assert service.returncode == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
    assert took < 3.0  # nothing was being scored: --grace-s is not waited for
    assert "Traceback" not in log and "ERROR" not in log and "CancelledError" not in log
    assert "ended before its body arrived: the service is shutting down" in log
