"""`python -m rlkit.eval model.path=MODEL_OR_RUN eval.benchmarks=[arithmetic,gsm8k] eval.n=8 eval.k=[1,4,8]`.

Hydra on configs/eval.yaml: the model, rollout and reward groups of training plus the `eval:` block
(configs/evaluation/default.yaml). A refused setting prints one line `rlkit: bad config: KEY: ... Fix: ...`.
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from rlkit.cli import hydra_argv, quiet_http_logs, refuse
from rlkit.config import CONFIG_DIR, ConfigError, register_resolvers

register_resolvers()


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base="1.3")
def run(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_http_logs()
    from rlkit.eval.job import run_job

    try:
        run_job(cfg)
    except ConfigError as err:
        refuse("bad config", err)


def main() -> None:
    sys.argv[1:] = hydra_argv(sys.argv[1:])
    run()


if __name__ == "__main__":
    main()
