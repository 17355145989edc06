# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both install from the committed lock (requirements/lock.txt: the exact version of every
# package in .venv), never from the bare ranges of pyproject.toml, so a new upstream release
# cannot change what CI runs. `make lock` moves the lock deliberately (pip-tools), and
# `make test-latest` runs the suite on the newest versions the ranges allow, in .venv-latest.
# torch is pinned by requirements/lock.in to 2.13.0, the CPU wheel this machine has on disk;
# an unpinned `torch` would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moecore-installed
LOCK   := requirements/lock.txt
TOOLS  := .venv-tools
LATEST := .venv-latest
PIP_TOOLS ?= pip-tools==7.7.0
# One pytest worker per core (pytest-xdist). docs/FAMILIES.md is written by whichever worker ends
# last, from the rows every worker left (tests/test_families.py: families_md).
PYTEST := -m pytest -q -p no:cacheprovider -n $(shell nproc) --dist loadgroup --durations=15
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: venv test demo corpus models clean bench lock test-latest check-results

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Regenerate the lock from pyproject.toml's ranges (plus requirements/lock.in), then run
# `make test` before committing it: moving the lock is a deliberate change.
lock:
	test -x $(TOOLS)/bin/pip-compile || ($(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/pip install -q '$(PIP_TOOLS)')
	$(TOOLS)/bin/pip-compile -q --upgrade --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	  --extra all --extra test -o $(LOCK) pyproject.toml requirements/lock.in

# The suite on the newest versions the ranges allow (kept out of CI): finds upstream drift
# before users do. Record the outcome in benchmarks/RESULTS.md.
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade -c requirements/lock.in -e '.[all,test]'
	$(LATEST)/bin/pip freeze | grep -iE '^(torch|transformers|accelerate|safetensors|lm.eval|hqq|datasets|tokenizers)=' 
	MOECORE_UNLOCKED=1 $(LATEST)/bin/python $(PYTEST) tests

test: $(STAMP)
	$(PY) $(PYTEST) tests

demo: $(STAMP)
	$(PY) scripts/demo.py

# Re-run a cheap subset of the rows recorded in benchmarks/RESULTS.md (original perplexity of
# both bundled models, HQQ 2-bit on both, moecore-q 0.5:4/4 and a zero-shot delta row on
# tiny-qwen3moe) and fail on drift beyond each row's documented tolerance. The rows, their
# commands, commits and tolerances: benchmarks/results/reference_rows.json; RESULTS.md §9.
# About 6 minutes of one CPU core (9 of wall time on the shared 2-core machine); not in CI.
check-results: $(STAMP)
	$(PY) benchmarks/check_results.py

# Rebuild the shipped data and models from scratch (not needed for demo/test).
corpus: $(STAMP)
	apt-get update -qq && apt-get install -y -qq bible-kjv jargon-text python3.11-doc
	$(PY) scripts/build_corpus.py
	$(PY) scripts/train_tokenizer.py

models: $(STAMP)
	$(PY) scripts/train_bundled.py tiny-mixtral --threads 1
	$(PY) scripts/train_bundled.py tiny-qwen3moe --threads 1
	$(PY) scripts/model_card.py models/tiny-mixtral models/tiny-qwen3moe

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
