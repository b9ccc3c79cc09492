"""The verifier stage of a run, from its `reward:` settings: an in-process pool or the service's client."""
from __future__ import annotations

import os
from typing import Mapping

from rlkit.registry import PluginSpec
from rlkit.reward.pool import VerifierPool


def make_scorer(verifier: PluginSpec, reward: Mapping):
    """`reward.url` set: a `RewardClient` for that service (checked now, so an unreachable one fails at start);
    else a `VerifierPool`. Both expose `score(responses, references) -> list[Score]` and `close()`."""
    if not reward["url"]:
        return VerifierPool(verifier.name, num_workers=reward["num_workers"], timeout_s=reward["timeout_s"],
                            options=verifier.options)
    from rlkit.reward.client import RewardClient

    token = os.environ.get(reward["token_env"]) if reward["token_env"] else None
    client = RewardClient(reward["url"], verifier=verifier.name, options=verifier.options, token=token,
                          timeout_s=reward["request_timeout_s"], retries=reward["retries"],
                          batch_size=reward["batch_size"])
    client.check()
    return client
