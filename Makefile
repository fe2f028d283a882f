# Maia Scheduler — the two commands a newcomer needs are `make demo` and `make test`.
# Both create the venv and install everything they need on a fresh machine.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
# Test processes: the suite waits on real controllers, simnodes and PostgreSQL much of the time,
# so two workers finish it sooner even on 2 cores (docs/benchmarks.md "Test suite"). 1 = serial.
PYTEST_WORKERS ?= 2
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: all install demo test test-slow postgres chromium proto proto-check lint bench clean

all: test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

## The main job: controller on SQLite + 64 simulated nodes + sample deployments, then shut down.
## `make demo ARGS=--keep-running` keeps it up until Ctrl-C.
demo: install
	bash deploy/demo.sh $(ARGS)

## The whole test suite, against SQLite and a real PostgreSQL the tests start themselves, and
## the web console in headless Chromium.
test: install postgres chromium
	@# Bytecode for the processes the tests start (real controllers, maiactl, simnodes): with
	@# PYTHONDONTWRITEBYTECODE set, as here, each would compile the project again (~0.5 s a controller).
	$(PY) -m compileall -q -j 0 controller scheduler proto bench tools > /dev/null
	$(VENV)/bin/pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

## Scale tests (marked slow), excluded from `make test`.
test-slow: install postgres
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

## PostgreSQL server binaries for the tests (Debian's package when they are missing).
postgres:
	@bash tools/ensure_postgres.sh

## Debian's chromium for the console's browser tests (installed when missing).
chromium:
	@bash tools/ensure_chromium.sh

proto: install
	$(PY) tools/gen_proto.py

proto-check: install
	$(PY) tools/gen_proto.py --check

lint: install
	$(VENV)/bin/lint-imports

bench: install
	$(PY) -m bench fgd --workload default --seeds 42-51 --mode online
	$(PY) -m bench synthetic --nodes 1024 4096 16384

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .run build *.egg-info
