"""`python -m rlkit.train [+recipe=NAME] [key=value ...]`: run an RL job from the Hydra config tree."""
from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from rlkit.config import CONFIG_DIR, ConfigError, register_resolvers, validate

register_resolvers()


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.getLogger("rlkit").setLevel(logging.INFO)
    try:
        validate(cfg)
    except ConfigError as err:
        print(f"rlkit: bad config: {err}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlkit.trainer.trainer import Trainer

    Trainer(cfg).fit()


if __name__ == "__main__":
    main()
