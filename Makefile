# Two commands for a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use. Torch goes in first as the local CPU wheel (torch==2.13.0), so no
# later requirement can pull a multi-GB CUDA build; everything else at the versions in constraints.txt
# (the environment the committed benchmark figures were measured in).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# One intra-op thread per process: on this 2-core machine torch with 2 threads next to one busy core
# ran 10x slower per step. Override with `make demo TORCH_THREADS=2`.
TORCH_THREADS ?= 1
export OMP_NUM_THREADS = $(TORCH_THREADS)
export MKL_NUM_THREADS = $(TORCH_THREADS)
export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup test test-all lint format bench demo tiny-policy test-sglang clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "not gpu"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy basis/advantages.py basis/losses.py basis/metrics.py   # strict (pyproject)

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The whole chain: tiny policy (if missing) -> GRPO -> harvest -> V0 -> V0.5 + OSLA and BASIS k=1,
# then a comparison table and the MLflow UI command (~8 minutes on 2 cores, +1-2 to build the tiny policy).
demo: setup
	$(PY) -m basis.demo

# Benchmarks print their figures and write JSON (with machine and date) to benchmarks/results/.
bench: setup tiny-policy
	$(PY) benchmarks/baseline_mse.py
	test -f runs/grpo-tiny/exports/step_000200/config.json || $(PY) -m basis.cli fit --config configs/policy/grpo_tiny.yaml
	$(PY) benchmarks/harvest_throughput.py
	$(PY) benchmarks/trainer_throughput.py
	$(PY) benchmarks/update_pass.py
	$(PY) benchmarks/rollout_efficiency.py
	$(PY) benchmarks/value_prior_quality.py

# The offline tiny policy (model + tokenizer + task data + eval.json) in artifacts/tiny-policy/.
# Skipped when it exists; `make tiny-policy FORCE=1` rebuilds.
tiny-policy: setup
	@if [ -f artifacts/tiny-policy/eval.json ] && [ "$(FORCE)" != "1" ]; then \
		echo "artifacts/tiny-policy/eval.json exists; FORCE=1 rebuilds"; \
	else \
		$(PY) -m basis.tiny_policy --config configs/tiny_policy.yaml; \
	fi

# Not in CI: builds .venv-sglang with the real sglang==0.5.23 (it pins torch 2.14.1 and transformers
# 5.19.0, ~11 GB) plus this project without its dependencies, then checks every request the SGLang engine
# builds against SGLang's own routes, request classes and serializer (CPU only, no GPU needed).
SGLANG_VENV := .venv-sglang
SGLANG_PY   := $(SGLANG_VENV)/bin/python

test-sglang:
	test -x $(SGLANG_PY) || $(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_PY) -m pip install -q "sglang==0.5.23" "peft>=0.21" "pytest>=8" "requests>=2.31"
	$(SGLANG_PY) -m pip install -q --no-deps -e .
	SGLANG_CONTRACT=1 $(SGLANG_PY) -m pytest -q -p no:cacheprovider tests/sglang_contract

clean:
	rm -rf artifacts runs .cache mlflow/mlflow.db mlflow/artifacts mlruns
