"""Load test: the reward service on loopback against the in-process VerifierPool, same machine, same run.

    python scripts/bench_reward_service.py --workers 2 --clients 4 --batch-size 16 --seconds 4 --rounds 2

Scores a fixed corpus of math-verify items (fractions, roots, intervals, sets, wrong and missing
answers, each after ~1 kB of reasoning text) for a bounded time, two ways:
- raw: ``VerifierPool("math", num_workers=W).score`` in a loop, batches of clients x batch-size items
  (as many items in flight as the service gets);
- service: ``python -m rlkit.reward.serve --workers W`` in a subprocess, driven by ``clients``
  threads each sending ``RewardClient.score`` batches of ``batch-size`` items.
Phases alternate (raw, service, raw, service, ...) so drift in machine load hits both.
Prints throughput (items/s), per-call latency p50/p99 and errors, and the service's overhead
= 1 - service items/s / raw items/s. On a shared machine throughput is noisy, so it also
prints CPU per item outside the workers ("front": the caller for raw; the service process plus
its clients for the service) and inside them, which other tenants do not skew. Results must
match: every service batch is checked against the raw pool's scores of the same items.

    python scripts/bench_reward_service.py --hostile   # ~30 s

measures the service under hostile local clients instead (see ``hostile``): option values of the
wrong type, more configurations than ``--max-pools``, 300 stalled connections, SIGTERM with a
stalled connection.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psutil  # noqa: E402

from rlkit.reward import VerifierPool  # noqa: E402
from rlkit.reward.client import RewardClient, RewardServiceError  # noqa: E402

FILLER = ("Let us reason step by step. First we write down what is given and simplify each term; "
          "then we combine the terms and check the result against the constraints. ") * 6


def corpus(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` (response, reference) pairs of mixed LaTeX forms and verdicts."""
    rng = random.Random(seed)
    responses, references = [], []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(2, 99)
        form = i % 8
        if form == 0:
            pair = (f"\\boxed{{\\frac{{{a}}}{{{b}}}}}", f"\\frac{{{2 * a}}}{{{2 * b}}}")  # fraction, correct
        elif form == 1:
            pair = (f"\\boxed{{{a + 1}}}", str(a))  # wrong integer
        elif form == 2:
            pair = (f"\\boxed{{\\sqrt{{{a * a * 2}}}}}", f"{a}\\sqrt{{2}}")  # root, correct
        elif form == 3:
            pair = (f"\\boxed{{({a}, {a + b}]}}", f"({a},{a + b}]")  # interval, correct
        elif form == 4:
            pair = (f"\\boxed{{\\{{{a},{b}\\}}}}", f"\\{{{b},{a}\\}}")  # set, correct
        elif form == 5:
            pair = (f"so the answer is {a * 1000:,}", str(a * 1000))  # last number with separators
        elif form == 6:
            pair = (f"\\boxed{{{a}\\%}}", f"{a}")  # percentage
        else:
            pair = ("I could not finish.", str(a))  # no answer
        responses.append(f"{FILLER}{pair[0]}")
        references.append(pair[1])
    return responses, references


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def cpu_s(process: psutil.Process, children: bool = False) -> float:
    """CPU seconds (user + system) used so far by ``process`` itself, or by its live children."""
    if not children:
        times = process.cpu_times()
        return times.user + times.system
    total = 0.0
    for child in process.children():
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def run_raw(pool: VerifierPool, batches: list[tuple[list[str], list[str]]], seconds: float) -> dict:
    latencies, items, errors, i = [], 0, 0, 0
    me = psutil.Process()
    cpu_caller, cpu_workers = cpu_s(me), cpu_s(me, children=True)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        responses, references = batches[i % len(batches)]
        tick = time.perf_counter()
        scores = pool.score(responses, references)
        latencies.append(time.perf_counter() - tick)
        items += len(scores)
        errors += sum(s.error in ("timeout", "worker_crash") for s in scores)
        i += 1
    return dict(items=items, seconds=time.perf_counter() - start, latencies=latencies, errors=errors,
                cpu_front_s=cpu_s(me) - cpu_caller, cpu_workers_s=cpu_s(me, children=True) - cpu_workers)


def run_service(server: psutil.Process, url: str, clients: int, batches: list[tuple[list[str], list[str]]],
                expected: dict, seconds: float) -> dict:
    latencies, counts = [], dict(items=0, errors=0, mismatches=0)
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def drive(offset: int) -> None:
        with RewardClient(url, verifier="math", retries=2, backoff_s=0.1) as client:
            i = offset
            while time.perf_counter() < stop_at:
                responses, references = batches[i % len(batches)]
                tick = time.perf_counter()
                try:
                    scores = client.score(responses, references)
                except RewardServiceError:
                    with lock:
                        counts["errors"] += len(responses)
                    continue
                elapsed = time.perf_counter() - tick
                bad = sum(s != expected[r, g] for s, r, g in zip(scores, responses, references))
                with lock:
                    latencies.append(elapsed)
                    counts["items"] += len(scores)
                    counts["mismatches"] += bad
                    counts["errors"] += sum(s.error in ("timeout", "worker_crash") for s in scores)
                i += clients

    me = psutil.Process()
    cpu_clients, cpu_server, cpu_workers = cpu_s(me), cpu_s(server), cpu_s(server, children=True)
    start = time.perf_counter()
    threads = [threading.Thread(target=drive, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return dict(counts, seconds=time.perf_counter() - start, latencies=latencies,
                cpu_front_s=cpu_s(me) - cpu_clients + cpu_s(server) - cpu_server,
                cpu_workers_s=cpu_s(server, children=True) - cpu_workers)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def summary(name: str, phases: list[dict]) -> dict:
    items = sum(p["items"] for p in phases)
    seconds = sum(p["seconds"] for p in phases)
    latencies = [x for p in phases for x in p["latencies"]]
    return dict(name=name, items=items, seconds=round(seconds, 2), items_per_s=round(items / seconds, 1),
                p50_ms=round(1000 * percentile(latencies, 0.5), 1), p99_ms=round(1000 * percentile(latencies, 0.99), 1),
                calls=len(latencies), errors=sum(p["errors"] for p in phases),
                mismatches=sum(p.get("mismatches", 0) for p in phases),
                front_cpu_ms_per_item=round(1000 * sum(p["cpu_front_s"] for p in phases) / items, 2),
                worker_cpu_ms_per_item=round(1000 * sum(p["cpu_workers_s"] for p in phases) / items, 2))


def service_rss_mib(server: psutil.Process) -> tuple[float, int]:
    """Resident memory of the service process and its workers (MiB), and the number of workers."""
    workers = server.children()
    rss = server.memory_info().rss
    for worker in workers:
        try:
            rss += worker.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(rss / 2**20, 1), len(workers)


STALLED = (b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           b"Content-Length: 100\r\n\r\n{")


def stall(port: int) -> socket.socket:
    """A connection that sends headers and ``{``, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(STALLED)
    return sock


def health_probes(url: str, n: int = 20) -> list[float]:
    """p50 and max latency (ms) of ``n`` GET /health, each on a new connection, as a liveness probe does."""
    latencies = []
    with httpx.Client(verify=False, headers={"Connection": "close"}, timeout=10) as http:
        for _ in range(n):
            tick = time.perf_counter()
            assert http.get(f"{url}/health").status_code == 200
            latencies.append(1000 * (time.perf_counter() - tick))
    return [round(percentile(latencies, 0.5), 1), round(max(latencies), 1)]


def hostile(workers: int) -> dict:
    """The service with default limits (``--max-pools 2`` to show eviction) under hostile local clients."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "rlkit.reward.serve", "--port", str(port), "--workers", str(workers),
         "--preload", "math", "--max-pools", "2", "--log-level", "warning"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    result: dict = {}
    try:
        proc = psutil.Process(server.pid)
        with RewardClient(url, verifier="math", retries=100, backoff_s=0.1, max_backoff_s=0.5) as client:
            client.score(["\\boxed{1}"], ["1"])  # up and warm
            result["rss_mib_start"], result["workers_start"] = service_rss_mib(proc)
            statuses = []
            for value in ("[1, 2]", "1e999", "2", "3", "4", "5"):  # issue 12's sequence
                body = f'{{"verifier": "math", "items": [], "options": {{"fallback_last_number": {value}}}}}'
                statuses.append(httpx.post(f"{url}/score", content=body, headers={"Content-Type": "application/json"},
                                           timeout=60).status_code)
            result["wrong_type_statuses"] = statuses
            rewards = []  # three valid configurations, round robin, two pools at a time
            for options in ({"fallback_last_number": False}, {"fallback_last_number": True}, {}) * 3:
                with RewardClient(url, verifier="math", options=options) as other:
                    rewards.append(other.score(["\\boxed{1}"], ["1"])[0].reward)
            result["valid_configs_rewards"] = rewards
            time.sleep(2.0)  # evicted pools' workers exit in the background
            result["rss_mib_after_abuse"], result["workers_after_abuse"] = service_rss_mib(proc)
            result["legit_after_abuse"] = client.score(["\\boxed{2}"], ["2"])[0].reward

            result["health_ms_p50_max_idle"] = health_probes(url)
            stalled = [stall(port) for _ in range(300)]
            result["health_ms_p50_max_under_300_stalled"] = health_probes(url)
            tick = time.perf_counter()
            result["score_under_stall"] = client.score(["\\boxed{3}"], ["3"])[0].reward
            result["score_ms_under_stall"] = round(1000 * (time.perf_counter() - tick), 1)
            time.sleep(11.0)  # past --read-timeout-s (10 s)
            open_after = 0
            for sock in stalled:
                sock.settimeout(0.01)
                try:
                    open_after += sock.recv(1) != b""
                except TimeoutError:
                    open_after += 1
                except ConnectionResetError:
                    pass
                sock.close()
            result["stalled_still_open_after_11_s"] = open_after
        last = stall(port)
        time.sleep(0.2)
        tick = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        result["sigterm_exit_s_with_a_stalled_connection"] = round(time.perf_counter() - tick, 2)
        last.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="verifier worker processes (both sides)")
    p.add_argument("--clients", type=int, default=4, help="concurrent service clients")
    p.add_argument("--batch-size", type=int, default=16, help="items per service request")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each measured phase")
    p.add_argument("--rounds", type=int, default=2, help="raw/service phase pairs")
    p.add_argument("--corpus", type=int, default=128, help="distinct items")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    p.add_argument("--hostile", action="store_true", help="measure the service under hostile clients instead")
    args = p.parse_args()
    if args.hostile:
        print(json.dumps(hostile(args.workers)))
        return

    responses, references = corpus(args.corpus)
    step = args.batch_size
    service_batches = [(responses[i:i + step], references[i:i + step]) for i in range(0, len(responses), step)]
    raw_step = args.batch_size * args.clients
    raw_batches = [(responses[i:i + raw_step], references[i:i + raw_step]) for i in range(0, len(responses), raw_step)]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "rlkit.reward.serve", "--port", str(port), "--workers", str(args.workers),
         "--preload", "math", "--log-level", "warning"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    raw_phases, service_phases = [], []
    try:
        with VerifierPool("math", num_workers=args.workers, timeout_s=10.0) as pool:
            warm = pool.score(responses, references)  # start-up and sympy's lazy imports, off the clock
            expected = {(r, g): s for r, g, s in zip(responses, references, warm)}
            with RewardClient(url, verifier="math", retries=100, backoff_s=0.1, max_backoff_s=0.5) as client:
                served = client.score(responses, references)  # waits for the service; same warm-up
            assert served == warm, "service and in-process scores differ"
            for round_ in range(args.rounds):
                raw_phases.append(run_raw(pool, raw_batches, args.seconds))
                service_phases.append(run_service(psutil.Process(server.pid), url, args.clients, service_batches,
                                                  expected, args.seconds))
                print(f"round {round_ + 1}: raw {raw_phases[-1]['items'] / raw_phases[-1]['seconds']:.0f} items/s, "
                      f"service {service_phases[-1]['items'] / service_phases[-1]['seconds']:.0f} items/s", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)

    raw, service = summary("raw VerifierPool", raw_phases), summary("service", service_phases)
    overhead = 1 - service["items_per_s"] / raw["items_per_s"]
    cpu_overhead = ((service["front_cpu_ms_per_item"] - raw["front_cpu_ms_per_item"])
                    / raw["worker_cpu_ms_per_item"])
    result = dict(workers=args.workers, clients=args.clients, batch_size=args.batch_size, cores=os.cpu_count(),
                  load_avg_1m=round(os.getloadavg()[0], 2), raw=raw, service=service,
                  service_overhead=round(overhead, 3), service_cpu_overhead=round(cpu_overhead, 3))
    print(f"{'':18} {'items/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'calls':>6} {'errors':>6} "
          f"{'front CPU ms/item':>18} {'worker CPU ms/item':>19}")
    for row in (raw, service):
        print(f"{row['name']:18} {row['items_per_s']:8.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f} "
              f"{row['calls']:6d} {row['errors']:6d} {row['front_cpu_ms_per_item']:18.2f} "
              f"{row['worker_cpu_ms_per_item']:19.2f}")
    print(f"service overhead: {100 * overhead:.1f}% of raw throughput (raw calls carry {raw_step} items, "
          f"service calls {step}); extra CPU outside the workers: {100 * cpu_overhead:.1f}% of the verification CPU")
    print(json.dumps(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if service["mismatches"]:
        sys.exit(f"{service['mismatches']} service scores differed from the in-process scores")


if __name__ == "__main__":
    main()
