"""Shared fixtures: tiny random models built once per session; environment for vLLM on CPU."""
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (real model or engine); deselect with -m 'not slow'")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with tied embeddings and a locally trained tokenizer."""
    from rlkit.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_tied"), tie_embeddings=True)


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory):
    """The same tiny Llama with a separate LM head."""
    from rlkit.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_untied"), tie_embeddings=False)


@pytest.fixture(scope="session")
def vllm_plugin_env(tmp_path_factory):
    """PYTHONPATH for the `vllm serve` processes tests start: this checkout's rlkit and tests/, and a distribution declaring
    rlkit's vLLM plugin entry point as pyproject.toml does (an editable install made before the entry point was
    added lacks it; a fresh `pip install -e .` has it)."""
    shim = tmp_path_factory.mktemp("plugin") / "rlkit_vllm_plugin-0.dist-info"
    shim.mkdir()
    (shim / "METADATA").write_text("Metadata-Version: 2.1\nName: rlkit-vllm-plugin\nVersion: 0\n")
    (shim / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nrlkit_weight_transfer = rlkit.rollout.shm_transfer:register\n")
    old = os.environ.get("PYTHONPATH")
    paths = [str(shim.parent), str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
    yield
    if old is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = old
