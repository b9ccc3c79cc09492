"""The reward service's counters and their Prometheus text rendering (``GET /metrics``)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rlkit.reward.verifiers import Score

# Request latency histogram buckets (seconds), Prometheus-style upper bounds.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


@dataclass
class ServiceMetrics:
    """Counters kept on the event loop's thread; rendered in Prometheus text format."""

    requests: Counter = field(default_factory=Counter)  # status code -> count (POST /score)
    items: Counter = field(default_factory=Counter)  # (verifier, "scored" | "unscorable") -> count
    item_errors: Counter = field(default_factory=Counter)  # (verifier, error kind) -> count
    timeouts: Counter = field(default_factory=Counter)  # verifier -> count
    retired_restarts: Counter = field(default_factory=Counter)  # verifier -> restarts of scorers since retired
    cancelled_items: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS_S))
    latency_sum_s: float = 0.0
    latency_count: int = 0

    def observe_request(self, status: int, seconds: float) -> None:
        self.requests[status] += 1
        self.latency_sum_s += seconds
        self.latency_count += 1
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.latency_buckets[i] += 1

    def observe_scores(self, verifier: str, scores: list[Score]) -> None:
        for score in scores:
            self.items[verifier, "scored" if score.reward is not None else "unscorable"] += 1
            if score.error is not None:
                kind = score.error.split(":", 1)[0]
                self.item_errors[verifier, kind] += 1
                if kind == "timeout":
                    self.timeouts[verifier] += 1

    def render(self, restarts: Counter, gauges: dict[str, int]) -> str:
        """Prometheus text: these counters, ``restarts`` (verifier -> worker restarts, live and retired
        scorers) and the service's gauges (queued_items, inflight_requests, pools, workers)."""
        m = self
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        family("rlkit_reward_requests_total", "counter", "POST /score requests by HTTP status.",
               [(_labels(code=str(code)), n) for code, n in sorted(m.requests.items())])
        family("rlkit_reward_items_total", "counter",
               "Items answered, by verifier and outcome (scored: reward not null).",
               [(_labels(verifier=v, outcome=o), n) for (v, o), n in sorted(m.items.items())])
        family("rlkit_reward_item_errors_total", "counter",
               "Items answered with an error code (no_answer is scorable; the rest are unscorable).",
               [(_labels(verifier=v, error=e), n) for (v, e), n in sorted(m.item_errors.items())])
        family("rlkit_reward_timeouts_total", "counter", "Items that hit the per-item timeout.",
               [(_labels(verifier=v), n) for v, n in sorted(m.timeouts.items())])
        family("rlkit_reward_worker_restarts_total", "counter", "Worker processes replaced after a timeout or crash.",
               [(_labels(verifier=v), n) for v, n in sorted(restarts.items())])
        family("rlkit_reward_items_cancelled_total", "counter",
               "Items whose client left before they were answered (those still queued are skipped).",
               [("", m.cancelled_items)])
        cumulative = [(_labels(le=_number(bound)), n) for bound, n in zip(LATENCY_BUCKETS_S, m.latency_buckets)]
        lines.append("# HELP rlkit_reward_request_seconds POST /score latency (all statuses).")
        lines.append("# TYPE rlkit_reward_request_seconds histogram")
        lines.extend(f"rlkit_reward_request_seconds_bucket{labels} {n}" for labels, n in cumulative)
        lines.append(f'rlkit_reward_request_seconds_bucket{{le="+Inf"}} {m.latency_count}')
        lines.append(f"rlkit_reward_request_seconds_sum {_number(m.latency_sum_s)}")
        lines.append(f"rlkit_reward_request_seconds_count {m.latency_count}")
        family("rlkit_reward_queued_items", "gauge", "Items waiting or being scored.", [("", gauges["queued_items"])])
        family("rlkit_reward_inflight_requests", "gauge", "Requests being scored.",
               [("", gauges["inflight_requests"])])
        family("rlkit_reward_pools", "gauge", "Live (verifier, options) configurations.", [("", gauges["pools"])])
        family("rlkit_reward_workers", "gauge", "Verifier worker processes configured.", [("", gauges["workers"])])
        return "\n".join(lines) + "\n"


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels.items()) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)
