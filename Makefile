# Every command a developer or CI runs. Only Python 3.11+ and make are needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The locks: exact versions with their hashes, made from pyproject.toml by `make lock`.
# requirements.txt is the app's (the Docker image installs it); requirements-dev.txt adds
# the test, lint and type-check tools, at the same versions for everything they share.
LOCK := requirements.txt
DEV_LOCK := requirements-dev.txt
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2
PIP_COMPILE := $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe --all-build-deps \
	--strip-extras --no-emit-index-url --no-emit-find-links

.PHONY: run test test-fast lint typecheck check bench soak fuzz chaos wrk simulator clean lock system-packages

# Reinstalls only when the dev lock or pyproject.toml changed since the last install.
$(STAMP): $(DEV_LOCK) pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is needed (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(DEV_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@$(BIN)/python -m pip check || { echo "$(DEV_LOCK) does not satisfy pyproject.toml:" \
		"run 'make lock' and commit $(LOCK) and $(DEV_LOCK)"; exit 1; }
	touch $(STAMP)

## lock: re-pin requirements.txt and requirements-dev.txt from pyproject.toml (after adding
##       a dependency; pins already there are kept: `make lock UPGRADE=1` moves them all)
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || \
		{ echo "lock with Python 3.11, the version CI and the image run"; exit 1; }
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)
	$(PIP_COMPILE) $(if $(UPGRADE),--upgrade) -o $(LOCK) pyproject.toml
	$(PIP_COMPILE) $(if $(UPGRADE),--upgrade) --extra dev -c $(LOCK) -o $(DEV_LOCK) pyproject.toml

## run: start the gateway on http://$HOST:$PORT (127.0.0.1:8000), settings from env/.env
run: $(STAMP)
	$(BIN)/python -m app

## test: lint, type-check and run the whole test suite (as root it first installs the
##       Debian packages the real-part tests use; without them those tests skip, saying why)
test: $(STAMP) lint typecheck system-packages
	$(BIN)/python -m pytest

## test-fast: the unit and in-process layer only (no subprocesses, Redis, browser or
##            fuzzing), and the import contracts: under a minute, for the edit-test loop
FAST := not (e2e or redis or browser or fuzz or sim)
test-fast: $(STAMP)
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -m "$(FAST)" -q -n auto

# chromium: the dashboard's browser test; redis-server: the multi-process tests;
# docker-compose: checks docker-compose.yml (it needs no engine for that).
SYSTEM_PACKAGES := chromium redis-server docker-compose
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do 		dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; 	if [ -z "$$missing" ]; then exit 0; fi; 	if [ "$$(id -u)" = 0 ]; then 		echo "installing Debian packages:$$missing"; 		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; 	else echo "not root: not installing$$missing (the tests that need them will skip)"; fi

lint: $(STAMP)
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

## check: test the Freelancer credentials in env/.env
check: $(STAMP)
	$(BIN)/python -m app check

## simulator: run the Freelancer simulator on 127.0.0.1:9000
simulator: $(STAMP)
	$(BIN)/python -m app.simulator --port 9000

## bench: performance targets, the budget's lanes over simulated hours (a minute),
##        refresh-ahead under a Zipf workload over three TTLs, on and off (20 s), what
##        counting popularity costs, then a 5-minute soak (app + simulator on loopback;
##        needs wrk); every part runs, and it exits 1 if any missed a target
bench: $(STAMP) wrk
	@status=0; for part in bench bench.budget bench.refresh_ahead bench.popularity bench.soak; do \
		echo "== python -m $$part"; $(BIN)/python -m $$part || status=1; \
	done; exit $$status

## fuzz: Schemathesis' command line, every check and phase (stateful too), against
##       python -m app on loopback: open, with keys, without callbacks (FUZZ_EXAMPLES=50)
fuzz: $(STAMP)
	$(BIN)/python -m tests.support.fuzz

## soak: only the soak (SOAK_SECONDS=300)
soak: $(STAMP)
	$(BIN)/python -m bench.soak --seconds $(or $(SOAK_SECONDS),300)

## chaos: several gateway processes on a real Redis under faults from a seeded schedule,
##        every upstream call in the simulator's ledger, every cross-process promise checked
##        (CHAOS_SECONDS=180; CHAOS_SEED replays a run's schedule); exit 1 when one broke
chaos: $(STAMP) system-packages
	$(BIN)/python -m tests.chaos --seconds $(or $(CHAOS_SECONDS),180) \
		$(if $(CHAOS_SEED),--seed $(CHAOS_SEED))

wrk:
	@command -v wrk >/dev/null || { \
		echo "installing wrk (Debian package) for the load generator"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq wrk; fi; }

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
