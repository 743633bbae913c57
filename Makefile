# The two set-up commands of the README:
#   make demo   set up, then run the main job (a demo appliance with sample data)
#   make test   set up, then run the test suite
# Each creates the virtualenv, installs the package (which builds the C
# helpers with cffi) and whatever else it needs, on a fresh machine: the one
# system package the build needs, lz4's header (Debian: liblz4-dev), is
# installed with apt-get when it is missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# test files run in this many processes at once (pytest-xdist; a file stays in
# one process, so its module-scoped clusters and containers are shared); most
# of a test's time is its controllers, agents and clients waiting on each other
TEST_WORKERS ?= 2
SOURCES := setup.py pyproject.toml $(wildcard cext/*.c cext/*.h cext/*.py)

.PHONY: demo test bench clean bytecode

$(STAMP): $(SOURCES)
	@test -f /usr/include/lz4.h || pkg-config --exists liblz4 2>/dev/null || { \
	  echo "installing liblz4-dev (lz4.h, needed to build the C helpers)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq liblz4-dev; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq liblz4-dev; fi; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

# The package's modules compiled to bytecode (what a pip install of the wheel
# does), so each process the demo, the tests and the benchmarks start loads
# them instead of compiling ~60 modules again (~0.1 s a start here: the
# environment may say PYTHONDONTWRITEBYTECODE, and an editable install
# writes none by itself). Only what changed is compiled again.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q -j 0 appliance bench

demo: $(STAMP) bytecode
	$(BIN)/appliance demo

# The systemd tests boot containers (systemd-nspawn, debootstrap): installed
# here when running as root on Debian; without them those tests are skipped.
test: $(STAMP) bytecode
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    ! { command -v systemd-nspawn && command -v debootstrap; } >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq systemd-container debootstrap; fi
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Benchmarks against py-lmdb and Redis (Debian's redis-server, installed here if missing);
# bench/run.py compiles the package's bytecode itself.
bench: $(STAMP)
	command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; } || true
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info appliance/_cext*.so appliance/_cext.c .pytest_cache .hypothesis
	find appliance bench tests -name __pycache__ -prune -exec rm -rf {} +
