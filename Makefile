# Two commands on a fresh machine:  `make train`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup train test test-fast system-deps

setup: $(VENV)/.installed

# torch first, pinned: 2.13.0 is the CPU build these machines install locally; letting
# pip resolve torch through the other dependencies would pull GBs of CUDA packages.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

train: setup
	$(VENV)/bin/seminar train

# Chromium (web page test) and promtool (metrics check) come from Debian's packages.
system-deps:
	bash scripts/system-deps.sh

test: setup system-deps
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow"
