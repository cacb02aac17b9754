# mailharbor: developer entry points. Works on a fresh Debian 12 machine as root.
#
#   make run         init a demo node in run/demo (once) and serve it
#   make test        clean up stale test leftovers, then the test suite
#   make lint        ruff check, ruff format --check, mypy --strict
#   make soak        the soak tests, with many Hypothesis examples
#   make bench       the quick benchmarks
#   make bench-deps  install Postfix/Dovecot for benchmarks (services disabled)
#   make clean       caches and build output; `make distclean` also .venv and run/
#
# Stamps: .venv/.stamp is rebuilt when pyproject.toml changes (pip install -e
# '.[dev]'); the apt step checks tools/apt-packages.txt with dpkg on every
# `make test` and only runs apt-get when something is missing.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp

# Per-test and whole-run time limits (seconds) for `make test`.
TEST_TIMEOUT ?= 120
TEST_SESSION_TIMEOUT ?= 4800
SOAK_TIMEOUT ?= 3600
PYTEST_ARGS ?=

DEMO_DIR ?= run/demo
DEMO_HOSTNAME ?= localhost

# Lint only the directories that hold Python files (mypy refuses empty ones).
LINT_DIRS := $(foreach d,src tests bench,$(if $(shell find $(d) -name '*.py' -print -quit 2>/dev/null),$(d)))

.PHONY: help venv apt lint test run bench bench-deps soak clean distclean

help:
	@sed -n '3,10p' Makefile | sed 's/^# \{0,1\}//'

venv: $(STAMP)

$(STAMP): pyproject.toml
	@if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then \
		tools/apt-install.sh python3 python3-venv; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

apt:
	@tools/apt-install.sh -f tools/apt-packages.txt

lint: venv
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)
	@# bench/ runs as scripts (bench/store.py is module "store"): checked on its own so its
	@# names never collide with test packages.
	$(BIN)/mypy --strict $(filter-out bench,$(LINT_DIRS))
	$(if $(filter bench,$(LINT_DIRS)),$(BIN)/mypy --strict bench)

test: venv apt
	@tools/cleanup.sh
	@# Byte-compile once: with PYTHONDONTWRITEBYTECODE set (as on CI machines) every node and
	@# CLI process the tests start would otherwise compile the package again (~0.3 s each).
	@$(BIN)/python -m compileall -q src tests bench >/dev/null
	MH_FAULT_STRICT=1 $(BIN)/pytest -p no:cacheprovider -m 'not soak' --durations=20 \
		--timeout=$(TEST_TIMEOUT) --session-timeout=$(TEST_SESSION_TIMEOUT) $(PYTEST_ARGS)

soak: venv apt
	@tools/cleanup.sh
	MAILHARBOR_SOAK=1 $(BIN)/pytest -p no:cacheprovider -m soak \
		--timeout=$(SOAK_TIMEOUT) $(PYTEST_ARGS) || { rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "make soak: no soak tests yet"; else exit $$rc; fi; }

run: venv
	@DEMO_DIR=$(DEMO_DIR) DEMO_HOSTNAME=$(DEMO_HOSTNAME) tools/run-demo.sh

bench: venv bench-deps
	$(BIN)/python bench/store.py --quick
	$(BIN)/python bench/smtp.py --quick
	$(BIN)/python bench/imap.py --quick
	$(BIN)/python bench/repl.py --quick
	$(BIN)/python bench/failover.py --quick

bench-deps:
	@tools/bench-deps.sh

clean:
	@tools/cleanup.sh
	rm -rf .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV) run
