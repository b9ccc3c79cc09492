"""Shared fixtures: tiny random models built once per session; environment for vLLM on CPU."""
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

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
