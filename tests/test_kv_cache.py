"""`rollout.engine.options.kv_cache_gib: auto`: the colocated engine's CPU KV cache sized to the largest batch the
prompts make (rlkit/rollout/kv_cache.py), by hand-counted blocks; vLLM's own count is checked in test_weight_sync."""
import json

import pytest

from rlkit.config import compose
from rlkit.errors import ConfigError
from rlkit.registry import PluginSpec
from rlkit.rollout import GenerationShape, make_engine
from rlkit.rollout.kv_cache import auto_kv_cache_gib, cache_blocks, kv_bytes_per_token
from rlkit.rollout.vllm_engine import VLLMEngine
from rlkit.trainer.trainer import generation_shape
from rlkit.validation import validate


def test_bytes_per_token_count_every_layers_keys_and_values(tiny_model_dir, tmp_path):
    assert kv_bytes_per_token(str(tiny_model_dir), "float32") == 2 * 2 * 2 * 32 * 4  # layers x K,V x heads x dims x 4
    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
              "head_dim": 32, "num_hidden_layers": 3, "intermediate_size": 128, "vocab_size": 100,
              "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert kv_bytes_per_token(str(tmp_path), "bfloat16") == 2 * 3 * 1 * 32 * 2  # head_dim given, not 64 / 4
    assert kv_bytes_per_token(str(tmp_path), "auto") == 2 * 3 * 1 * 32 * 2  # the checkpoint's own dtype
    assert kv_bytes_per_token(str(tmp_path), "float32") == 2 * 3 * 1 * 32 * 4


def test_blocks_hold_the_longest_prompts_at_full_length():
    # prompt + 64 new tokens in 128-token blocks: 10 -> 1, 100 -> 2, 200 -> 3, 50 -> 1
    shape = GenerationShape((10, 100, 200, 50), prompts=2, n=3, max_tokens=64)
    # each + 1: the null block vLLM keeps back
    assert cache_blocks(shape, max_model_len=1024, max_num_seqs=256) == 3 * 3 + 3 * 2 + 1  # the 2 longest prompts x n
    assert cache_blocks(shape, max_model_len=1024, max_num_seqs=4) == 3 + 3 + 3 + 2 + 1  # 4 sequences at once
    assert cache_blocks(shape, max_model_len=256, max_num_seqs=256) == 3 * 2 + 3 * 2 + 1  # 264 tokens capped at 256
    tiny = GenerationShape((5,), prompts=1, n=1, max_tokens=10)
    assert cache_blocks(tiny, max_model_len=1024, max_num_seqs=256) == 8 + 1  # vLLM needs one 1,024-token sequence


def test_the_default_jobs_cache(tiny_model_dir):
    """SmolLM2-135M's 46,080 bytes a token (30 layers x K,V x 3 heads x 64 dims x 4 bytes) on the default job's
    batch (8 prompts of at most 55 tokens x 8 samples x 128 new tokens: 2 blocks each, and the null block) is
    0.71 GiB, not 1."""
    shape = GenerationShape((55,) * 4096, prompts=8, n=8, max_tokens=128)
    assert cache_blocks(shape, max_model_len=1024, max_num_seqs=256) == 129
    assert 129 * 128 * 46_080 / 2**30 == pytest.approx(0.709, abs=1e-3)
    assert auto_kv_cache_gib(str(tiny_model_dir), "float32", shape, max_model_len=1024) == 129 * 128 * 1024 / 2**30


def test_the_trainer_sizes_for_its_share_of_every_prompt():
    cfg = compose(["trainer.prompts_per_step=8", "rollout.n=4", "rollout.max_tokens=96"])
    rows = [{"question": "a"}, {"question": "abcd"}, {"question": "ab"}]
    shape = generation_shape(cfg, rows, lambda row: list(row["question"]), world_size=2)
    assert shape == GenerationShape((1, 4, 2), prompts=4, n=4, max_tokens=96)


def test_auto_is_the_default_and_needs_the_batch(tiny_model_dir):
    cfg = compose([])
    assert cfg.rollout.engine.options.kv_cache_gib == "auto"
    spec = PluginSpec("vllm", {"kv_cache_gib": "auto"})
    with pytest.raises(ValueError, match="GenerationShape"):
        make_engine(spec, str(tiny_model_dir), "float32")
    with pytest.raises(ValueError, match="make_engine"):
        VLLMEngine(str(tiny_model_dir), kv_cache_gib="auto")


@pytest.mark.parametrize("value, ok", [("auto", True), (0.5, True), (None, True), ("big", False), (0, False)])
def test_the_size_is_a_positive_number_auto_or_null(value, ok):
    cfg = compose([f"rollout.engine.options.kv_cache_gib={'null' if value is None else value}"])
    if ok:
        validate(cfg)
    else:
        with pytest.raises(ConfigError, match="kv_cache_gib: must be a number > 0 or auto or null"):
            validate(cfg)
