# The two set-up commands of the README:
#   make demo   set up, then run the main job (a demo appliance with sample data)
#   make test   set up, then run the test suite
# Each creates the virtualenv, installs the package (which builds the C
# helpers with cffi) and whatever else it needs, on a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SOURCES := setup.py pyproject.toml $(wildcard cext/*.c cext/*.h cext/*.py)

.PHONY: demo test bench clean

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/appliance demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Benchmarks against py-lmdb and Redis (Debian's redis-server, installed here if missing).
bench: $(STAMP)
	command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; } || true
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info appliance/_cext*.so appliance/_cext.c .pytest_cache .hypothesis
