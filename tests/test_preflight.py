"""What a run needs from this machine is refused in one line before anything loads: a hub model name that is
neither cached nor reachable, a metrics sink whose package is missing. No test here needs the network."""
import sys
import time

import pytest

from rlkit.config import ConfigError, compose
from rlkit.validation import validate
from rlkit.preflight import check_model_path

HUB_NAME = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """An empty HF cache, HF_HUB_OFFLINE unset, and a hub endpoint where nothing listens."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return tmp_path / "hub"


def test_hub_name_offline_is_one_line_naming_a_local_dir(unreachable_hub):
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        validate(compose([f"model.path={HUB_NAME}"]))
    message = str(err.value)
    assert time.monotonic() - start < 10 and "\n" not in message
    assert message.startswith(f"model.path: {HUB_NAME} is not in the local Hugging Face cache and "
                              "http://127.0.0.1:9 does not answer")
    assert "make setup" in message and "model.path=<local dir>" in message


def test_hub_name_in_the_local_cache_is_accepted(unreachable_hub):
    snapshot = unreachable_hub / "models--Qwen--Qwen2.5-0.5B-Instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (unreachable_hub / "models--Qwen--Qwen2.5-0.5B-Instruct" / "refs").mkdir()
    (unreachable_hub / "models--Qwen--Qwen2.5-0.5B-Instruct" / "refs" / "main").write_text("abc123")
    check_model_path(HUB_NAME)


def test_hub_name_with_hf_hub_offline_is_refused(unreachable_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"^model.path: .* not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        check_model_path(HUB_NAME)


@pytest.mark.parametrize("key, package", [("logging.wandb", "wandb"), ("logging.tensorboard", "tensorboard")])
def test_a_sink_without_its_package_is_refused(tiny_model_dir, monkeypatch, key, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if it were not installed
    with pytest.raises(ConfigError, match=rf"^{key}: true needs the {package} package, which is not installed. "
                                          rf"Fix: pip install {package}, or set {key}=false$"):
        validate(compose([f"model.path={tiny_model_dir}", f"{key}=true"]))
