# dbguard: two commands on a fresh machine — `make demo` and `make test`.
SHELL := /bin/bash
PY    ?= python3
VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
TOOLS ?= $(HOME)/.cache/dbguard-tools/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test deps system-deps venv tools lint bench fuzz clean help

help:
	@echo "make demo   - start PostgreSQL + dbguard with the example policy and show deny, mask, approval, audit"
	@echo "make test   - install what is needed and run the whole suite"
	@echo "make bench  - pgbench through dbguard vs direct vs PgBouncer"
	@echo "make lint   - ruff"
	@echo "make fuzz   - atheris over pgwire and analyze, FUZZ_SECONDS each (default 600); see fuzz/README.md"

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

FUZZ_SECONDS ?= 600
fuzz: venv
	@mkdir -p fuzz/artifacts
	@for t in pgwire analyze; do \
	  mkdir -p fuzz/work/$$t fuzz/regressions/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS)s"; \
	  $(BIN)/python -m fuzz $$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -print_final_stats=1 -dict=fuzz/$$t.dict -artifact_prefix=fuzz/artifacts/$$t- \
	    fuzz/work/$$t fuzz/corpus/$$t fuzz/regressions/$$t || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache build
