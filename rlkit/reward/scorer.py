"""The verifier stage of a run, from its `reward:` settings: an in-process pool or the service's client."""
from __future__ import annotations

import os
from typing import Mapping
from urllib.parse import urlsplit

from rlkit.errors import ConfigError
from rlkit.registry import PluginSpec
from rlkit.reward.pool import VerifierPool


def make_scorer(verifier: PluginSpec, reward: Mapping):
    """`reward.url` set: a `RewardClient` for that service (checked now, so an unreachable one fails at start);
    else a `VerifierPool`. Both expose `score(responses, references) -> list[Score]` and `close()`."""
    if not reward["url"]:
        return VerifierPool(verifier.name, num_workers=reward["num_workers"], timeout_s=reward["timeout_s"],
                            options=verifier.options)
    return connect(verifier, reward)


def connect(verifier: PluginSpec, reward: Mapping):
    """A checked `RewardClient` for `reward.url`. Raises ConfigError, naming the `reward.*` key and the fix, when
    the service cannot be used: nothing listens there (at once, no retries), it refuses the token, or it refuses
    the verifier. Light: imports no model code, so commands call it before anything heavy loads."""
    from rlkit.reward.client import RewardClient, RewardServiceError

    url, token_env = reward["url"], reward["token_env"]
    token = os.environ.get(token_env) if token_env else None
    client = RewardClient(url, verifier=verifier.name, options=verifier.options, token=token,
                          timeout_s=reward["request_timeout_s"], retries=reward["retries"],
                          batch_size=reward["batch_size"])
    try:
        client.check()
    except RewardServiceError as err:
        client.close()
        raise ConfigError(_unusable(err, url, token_env, token)) from err
    return client


def _unusable(err, url: str, token_env: str | None, token: str | None) -> str:
    """The refusal for a service that failed `check()`: the key to change and how."""
    if err.refused:
        port = urlsplit(url).port
        serve = "python -m rlkit.reward.serve" + (f" --port {port}" if port else "")
        return (f"reward.url: nothing is listening at {url} (connection refused). Fix: start `{serve}` there "
                f"first, or set reward.url=null to score in-process")
    if err.status == 401:
        if not token_env:
            return (f"reward.token_env: the reward service at {url} wants a bearer token and reward.token_env is "
                    f"null. Fix: set reward.token_env=VAR and export VAR=<the service's token>")
        problem = f"refused the token in ${token_env}" if token else f"wants a token and ${token_env} is unset"
        return (f"reward.token_env: the reward service at {url} {problem}. Fix: export {token_env}=<the token the "
                f"service was started with (its --token-env variable)>, or set reward.token_env to the variable "
                f"that holds it")
    return f"reward.url: {err}"
