#!/usr/bin/env bash
# GPU check on a lent device machine (its image has torch + transformers, no vLLM): the trainer's CUDA path
# with the HF engine, a 0.5B Qwen2-shaped random model, bf16 autocast; plus the CPU suite's engine-free tests.
set -uo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' 2>&1 | tee "$OUT/build.txt"
from pathlib import Path
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from rlkit.models.tiny import build_tiny_model
d = build_tiny_model(Path("/tmp/qwen05"), arch="qwen2", tie_embeddings=True)
cfg = Qwen2Config(vocab_size=1000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                  bos_token_id=0, eos_token_id=2, pad_token_id=0)
torch.manual_seed(0)
model = Qwen2ForCausalLM(cfg)
model.save_pretrained(d)
print("params", sum(p.numel() for p in model.parameters()) / 1e6, "M")
PY
python3 -m pytest -q -p no:cacheprovider -x tests/test_logprobs.py tests/test_losses.py tests/test_advantages.py \
  "tests/test_weight_sync.py::test_pushed_weights_match_trainer[hf-tiny_model_dir]" 2>&1 | tail -3 | tee "$OUT/pytest.txt"
python3 -m rlkit.train model.path=/tmp/qwen05 rollout.engine=hf rollout.dtype=bfloat16 trainer.mixed_precision=bf16 \
  reward.verifier=rl_tasks:contains_seven trainer.total_steps=8 trainer.lr=1e-5 rollout.n=8 trainer.prompts_per_step=8 \
  rollout.max_tokens=128 trainer.micro_batch_size=32 data.limit=256 logging.output_dir=/tmp/runs logging.run_name=gpu \
  logging.progress_bar=false trainer.save_every=0 2>&1 | grep -E "step [0-9]|Error|error" | tee "$OUT/train.txt"
cp /tmp/runs/gpu/metrics.jsonl "$OUT/metrics.jsonl"
