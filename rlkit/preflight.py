"""What a run needs from this machine, checked before anything heavy loads: the model's files, optional packages."""
from __future__ import annotations

import importlib.util
import os
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import DictConfig

from rlkit.errors import require

HUB_TIMEOUT_S = 2.0  # how long the hub may take to answer before a hub model name is refused
# logging key -> the package it needs
OPTIONAL_PACKAGES = {"logging.wandb": "wandb", "logging.tensorboard": "tensorboard"}


def check_machine(cfg: DictConfig) -> None:
    """The model is a local directory, in the Hugging Face cache, or on a hub that answers; sinks are installed."""
    check_model_path(str(cfg.model.path))
    for key, package in OPTIONAL_PACKAGES.items():
        require(not cfg.logging[key.split(".")[1]] or _installed(package), key, f"true needs the {package} package, "
                "which is not installed", f"pip install {package}, or set {key}=false")


def check_model_path(path: str) -> None:
    local = Path(path).expanduser()
    if local.exists():
        require((local / "config.json").is_file(), "model.path", f"{path} has no config.json",
                "point model.path at a Hugging Face model directory")
        return
    setup = "run `make setup` for the default SmolLM2-135M-Instruct, or set model.path=<local dir>"
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    require(not looks_local, "model.path", f"{path} does not exist", setup)
    if _in_hf_cache(path):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    require(not offline, "model.path", f"{path} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set", setup)
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    require(_answers(endpoint), "model.path", f"{path} is not in the local Hugging Face cache and {endpoint} does not "
            f"answer within {HUB_TIMEOUT_S:g} s (offline?)", setup)


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _answers(url: str) -> bool:
    """Whether a server answers at `url` (any HTTP status counts) within HUB_TIMEOUT_S."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=HUB_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):  # refused, unreachable, timed out, a malformed URL
        return False
    return True


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # sys.modules[package] is None: imports of it are blocked
        return False
