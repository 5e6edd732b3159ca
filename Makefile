# dbguard: two commands on a fresh machine — `make demo` and `make test`.
SHELL := /bin/bash
PY    ?= python3
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS ?= $(HOME)/.cache/dbguard-tools/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test deps system-deps venv tools lint bench clean help

help:
	@echo "make demo   - start PostgreSQL + dbguard with the example policy and show deny, mask, approval, audit"
	@echo "make test   - install what is needed and run the whole suite"
	@echo "make bench  - pgbench through dbguard vs direct vs PgBouncer"
	@echo "make lint   - ruff"

system-deps:
	@bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

deps: system-deps venv

tools:
	@bash scripts/build-test-tools.sh opa etcd k8s helm

lint: venv
	$(BIN)/ruff check operator tests bench scripts

test: deps tools
	$(BIN)/ruff check operator tests bench scripts
	$(BIN)/python -m pytest -p no:cacheprovider

demo: deps
	@bash scripts/demo.sh

bench: deps
	$(BIN)/python bench/pgbench_compare.py

clean:
	rm -rf $(VENV) .pytest_cache build
