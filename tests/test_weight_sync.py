"""After an optimizer step and a push, the vLLM engine samples from exactly the trainer's weights."""
import os

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlkit.registry import PluginSpec
from rlkit.rollout import GenerationShape, SamplingConfig, create_engine, make_engine
from rlkit.rollout.kv_cache import CPU_BLOCK_TOKENS
from rlkit.sampling.samplers import SamplerContext, sample_groups
from rlkit.trainer.logprobs import policy_logprobs


class _Tok:
    def batch_decode(self, ids, skip_special_tokens=True):
        return ["" for _ in ids]


def _trainer_logprobs(model, batch, temperature):
    with torch.no_grad():
        return policy_logprobs(model, batch.prompt_ids, batch.response_ids, batch.response_mask,
                               pad_id=0, temperature=temperature).logprobs


def _sample(engine, prompts, temperature, seed):
    ctx = SamplerContext(engine=engine, tokenizer=_Tok(), pad_id=0, score=None,
                         sampling=SamplingConfig(n=3, temperature=temperature, max_tokens=24, seed=seed),
                         build_prompt=lambda row: row["ids"])
    return sample_groups([{"ids": p} for p in prompts], ctx, first_group_id=0)


def _train_one_step(model, lr=5e-2):
    """A real AdamW step on a language-modelling loss: every weight moves, tied ones included."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.randint(3, 900, (4, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_untied_model_dir"])
@pytest.mark.parametrize("engine_name", ["vllm", "hf"])
def test_pushed_weights_match_trainer(request, fixture, engine_name):
    model_dir = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    options = {"max_model_len": 256, "kv_cache_gib": 0.5, "max_num_seqs": 2, "release_kv_cache": True} \
        if engine_name == "vllm" else {}
    engine = create_engine(engine_name, str(model_dir), **options)
    if engine_name == "vllm":  # kv_cache_gib sizes the cache in bytes, over VLLM_CPU_KVCACHE_SPACE=1 (conftest.py)
        assert engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == 2**29
        assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1"  # hidden only while the engine started: servers see it
        assert engine.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 2  # 3 prompts x n: decoded 2 at a time
    prompts = [[11, 12, 13, 14], [20, 21], [30, 31, 32, 33, 34, 35]]
    try:
        for temperature in (1.0, 0.7):
            batch = _sample(engine, prompts, temperature, seed=1)
            gap = (_trainer_logprobs(model, batch, temperature) - batch.behavior_logprobs).abs() * batch.response_mask
            assert gap.max() < 1e-4
        if engine_name == "vllm":  # the update's sleep returns the KV cache's memory; wake gives it back zeroed
            _kv_cache_released_and_restored(engine, prompts, batch)

        _train_one_step(model)
        stale = _sample(engine, prompts, 1.0, seed=2)
        stale_gap = (_trainer_logprobs(model, stale, 1.0) - stale.behavior_logprobs).abs().max()
        assert stale_gap > 1e-2  # the check below can fail: before the push the engine is off

        engine.update_weights(model.state_dict().items())
        for temperature in (1.0, 0.7):
            batch = _sample(engine, prompts, temperature, seed=3)
            gap = (_trainer_logprobs(model, batch, temperature) - batch.behavior_logprobs).abs() * batch.response_mask
            assert gap.max() < 1e-4
    finally:
        engine.close()


def _kv_cache_released_and_restored(engine, prompts, sampled):
    """`sampled`: a batch `engine` sampled at temperature 0.7, seed 1, before the release."""
    size = engine.kv_cache_bytes()
    resident = psutil.Process().memory_info().rss
    engine.sleep()
    assert engine.kv_cache_bytes() == 0 and resident - psutil.Process().memory_info().rss > 0.9 * size
    engine.wake()
    assert engine.kv_cache_bytes() == size > 0.9 * 2**29
    assert engine.llm.collective_rpc(lambda worker: all(
        not tensor.any() for tensor in worker.model_runner.kv_caches)) == [True]  # zeroed, as vLLM allocates it
    again = _sample(engine, prompts, 0.7, seed=1)  # the same samples: no prefix from before the release is reused
    assert torch.equal(again.response_ids, sampled.response_ids)
    assert torch.equal(again.behavior_logprobs, sampled.behavior_logprobs)


@pytest.mark.slow
def test_pushed_weights_match_trainer_on_smollm2():
    """The real default model (tied embeddings, 49k vocabulary), as prepared by `make setup`."""
    from rlkit.models.prepare import default_model_dir, is_prepared

    model_dir = default_model_dir()
    if not is_prepared(model_dir):
        pytest.skip("SmolLM2-135M-Instruct is not prepared: run `make setup`")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = [[1, 9690, 198, 2683, 314, 216, 34, 1232, 216, 37, 47], [1, 4093, 198, 14368, 30]]
    shape = GenerationShape(tuple(map(len, prompts)), prompts=2, n=3, max_tokens=24)  # as _sample asks
    engine = make_engine(PluginSpec("vllm", {"max_model_len": 512, "kv_cache_gib": "auto"}), str(model_dir), "float32",
                         shape)
    try:
        # vLLM takes the cache rlkit sized: its 128-token blocks, 6 sequences of one block each (at least the
        # 4 blocks of one 512-token sequence) and its null block, at 46,080 bytes a token (30 layers x K,V x
        # 3 heads x 64 dims x 4 bytes); all 6 sequences fit at once
        cache = engine.llm.llm_engine.vllm_config.cache_config
        assert (cache.block_size, cache.num_gpu_blocks) == (CPU_BLOCK_TOKENS, 7)
        assert cache.kv_cache_memory_bytes == 7 * 128 * 46_080
        _train_one_step(model, lr=1e-4)
        engine.update_weights(model.state_dict().items())
        batch = _sample(engine, prompts, 1.0, seed=5)
        gap = (_trainer_logprobs(model, batch, 1.0) - batch.behavior_logprobs).abs() * batch.response_mask
        assert gap.max() < 2e-4 and gap.sum() / batch.response_mask.sum() < 1e-5
    finally:
        engine.close()
