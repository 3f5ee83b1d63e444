# fedasr — `make install`, `make test`, `make demo`. Each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FEDASR := $(VENV)/bin/fedasr
STAMP := $(VENV)/.installed
# The CPU wheel is enough here; on a GPU machine install your CUDA build of torch first.
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: install test test-fast demo curve curve-structured system-deps clean

# everything the demo needs, the Debian text-to-speech packages included (`fedasr synth` alone
# runs them); real data needs only `pip install .[export,flower]` (docs/data.md)
install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml scripts/install_system_deps.sh
	scripts/install_system_deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,export,flower]'
	touch $(STAMP)

system-deps:
	scripts/install_system_deps.sh

# everything: unit tests and the end-to-end tests (synthetic corpus, CLI subprocesses)
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# unit tests only (no corpus synthesis, no subprocesses)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS)

# The main job on the embedded default: synthetic corpus (clients + the server's own
# speakers) -> federation -> the ci recipe's sweep (the seed model on the server's data,
# then from it: dense, column/magnitude/adaptive Federated Pruning at 0.5 and 0.9,
# FedTiny at 0.9, and the server-only baseline at 0.5 and 0.9; WER on
# test-clean/test-other for each)
# -> $(DEMO_DIR)/sweep/wer_vs_sparsity.{csv,png}.
demo: $(DEMO_DIR)/federation/federation.yaml curve

$(DEMO_DIR)/federation/federation.yaml: $(STAMP)
	$(FEDASR) synth --out $(DEMO_DIR)/corpus --speakers 24 --server-speakers 24 --utterances-per-speaker 50 \
	    --domain small --seed 0 --overwrite
	$(FEDASR) shard --corpus $(DEMO_DIR)/corpus/LibriSpeech --train-split train --server-split train-server \
	    --dev-split dev --test-split test-clean --test-split test-other --by speaker --vocab-size 64 \
	    --out $(DEMO_DIR)/federation --overwrite

# The full ci recipe (re-running skips finished runs).
curve: $(STAMP)
	$(FEDASR) sweep recipes/ci.yaml --federation $(DEMO_DIR)/federation --out $(DEMO_DIR)/sweep --jobs 2

# Structured pruning on the same recipe: FP unit pattern vs Automatic Structured Pruning
curve-structured: $(DEMO_DIR)/federation/federation.yaml
	$(FEDASR) sweep recipes/ci_structured.yaml --federation $(DEMO_DIR)/federation \
	    --out $(DEMO_DIR)/sweep-structured --jobs 2

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
