# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch is pinned here (not in pyproject) because 2.13.0 is the CPU wheel this machine has
# on disk; an unpinned `torch` would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moecore-installed
TORCH  ?= torch==2.13.0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: venv test demo corpus models clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[all,test]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(PY) scripts/demo.py

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
