# Threadline: `make up` runs the whole system locally, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install system-packages up cluster test lint bench bench-handoff bench-chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The one system package the tests need (PostgreSQL comes from the pgserver wheel): Debian's
# chromium for the browser tests. Installed with apt-get when running as root; otherwise the
# command to run is printed and make stops.
system-packages:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium (browser tests)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "the browser tests need Debian's chromium; run:  sudo apt-get install -y chromium  and then make test again" >&2; \
	    exit 1; \
	  fi; }

up: $(STAMP)
	$(BIN)/threadline up $(ARGS)

cluster: $(STAMP)
	$(BIN)/threadline up --cluster $(ARGS)

# The suite mostly waits (real servers, browsers, sockets): two worker processes use the idle
# half of this 2-core machine and take it from ~14 to ~9 minutes. (One run with three failed
# three tests: a finished test's service, still reconnecting, joined another worker's
# nats-server on the port it had reused; test NATS passwords are now per process, and two
# workers leave more room.) A file's tests stay on one worker (`loadfile`), so its module
# fixtures are shared as before. `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP) system-packages
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/e2e.py $(ARGS)

bench-handoff: $(STAMP)
	$(BIN)/python bench/handoff.py $(ARGS)

bench-chaos: $(STAMP)
	$(BIN)/python bench/chaos.py $(ARGS)

clean:
	rm -rf $(VENV) .threadline .pytest_cache .mypy_cache .ruff_cache
