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

.PHONY: install test test-fast demo curve curve-full curve-structured system-deps clean

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

# The main job on the embedded default: synthetic corpus (24 client speakers + 6 as the
# server's own data) -> federation -> a part of the ci recipe's sweep that tells its story:
# the seed model on the server's data, then from it dense, Federated Pruning unstructured and
# unit (structured) at 0.5, and the references at 0.5 (server-only: the server's data alone;
# centralized: the clients' data pooled); WER on test-clean/test-other for each
# -> $(DEMO_DIR)/sweep/wer_vs_sparsity.{csv,png}.
CI_SWEEP = $(FEDASR) sweep recipes/ci.yaml --federation $(DEMO_DIR)/federation --out $(DEMO_DIR)/sweep --jobs 2
DEMO_RUNS := --only dense --only unstructured-magnitude-adaptive@0.5 --only unit-magnitude-global@0.5 \
	--only server-only@0.5 --only centralized@0.5
demo: $(DEMO_DIR)/federation/federation.yaml
	$(CI_SWEEP) $(DEMO_RUNS)

$(DEMO_DIR)/federation/federation.yaml: $(STAMP)
	$(FEDASR) synth --out $(DEMO_DIR)/corpus --speakers 24 --server-speakers 6 --utterances-per-speaker 50 \
	    --domain small --seed 0 --overwrite
	$(FEDASR) shard --corpus $(DEMO_DIR)/corpus/LibriSpeech --train-split train --server-split train-server \
	    --dev-split dev --test-split test-clean --test-split test-other --by speaker --vocab-size 64 \
	    --out $(DEMO_DIR)/federation --overwrite

# The whole figure (README's): every scheme and sparsity of the ci recipe in the demo's sweep
# directory (the demo's finished runs are skipped); its CSV and plot are copied to docs/.
curve-full: $(DEMO_DIR)/federation/federation.yaml
	$(CI_SWEEP)
	cp $(DEMO_DIR)/sweep/wer_vs_sparsity.csv docs/wer_vs_sparsity_full.csv
	cp $(DEMO_DIR)/sweep/wer_vs_sparsity.png docs/wer_vs_sparsity_full.png

# the demo's sweep alone again (finished runs are skipped)
curve: $(STAMP)
	$(CI_SWEEP) $(DEMO_RUNS)

# More structured patterns and ASP's third k on the same recipe and seed
curve-structured: $(DEMO_DIR)/federation/federation.yaml
	$(FEDASR) sweep recipes/ci_structured.yaml --federation $(DEMO_DIR)/federation \
	    --out $(DEMO_DIR)/sweep-structured --jobs 2

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
