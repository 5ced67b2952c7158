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

# Tiers (tests/conftest.py): a test that uses Ray, Serve, Chromium or a subprocess server is
# marked slow by the fixtures it uses. `make test-fast` runs the rest (a few minutes on 2 cores;
# what a change is checked with); `make test` runs the fast tier, then the slow one, both to
# the end, and fails if either failed. pytest-timeout (pyproject.toml) turns a hang into a
# named failure. PYTEST_ARGS passes more: `make test PYTEST_ARGS=--reversed`, or
# `PYTEST_ARGS="-p random_order --random-order"`.
# The fast tier runs on every core (pytest-xdist: its tests are single-threaded and share
# nothing); the slow tier in one process, as its tests share one Ray cluster.
PYTEST_ARGS ?=
PYTEST := OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} $(PY) -m pytest -q -ra --durations=25 $(PYTEST_ARGS)
FAST_TIER := -n auto -m "not slow"

test: setup system-deps
	@fast=0; $(PYTEST) $(FAST_TIER) || fast=$$?; \
	slow=0; $(PYTEST) -m slow || slow=$$?; \
	echo "make test: fast tier exit $$fast, slow tier exit $$slow"; \
	[ $$fast -eq 0 ] && [ $$slow -eq 0 ]

test-fast: setup
	$(PYTEST) $(FAST_TIER)
