# Every command a developer or CI runs. Only Python 3.11+ and make are needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck check bench soak wrk simulator clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11 or newer is needed (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## run: start the gateway on http://$HOST:$PORT (127.0.0.1:8000), settings from env/.env
run: $(STAMP)
	$(BIN)/python -m app

## test: lint, type-check and run the whole test suite
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check app tests bench
	$(BIN)/ruff format --check app tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

## check: test the Freelancer credentials in env/.env
check: $(STAMP)
	$(BIN)/python -m app check

## simulator: run the Freelancer simulator on 127.0.0.1:9000
simulator: $(STAMP)
	$(BIN)/python -m app.simulator --port 9000

## bench: performance targets, then a 5-minute soak (app + simulator on loopback; needs wrk)
bench: $(STAMP) wrk
	$(BIN)/python -m bench
	$(BIN)/python -m bench.soak

## soak: only the soak (SOAK_SECONDS=300)
soak: $(STAMP)
	$(BIN)/python -m bench.soak --seconds $(or $(SOAK_SECONDS),300)

wrk:
	@command -v wrk >/dev/null || { \
		echo "installing wrk (Debian package) for the load generator"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq wrk; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq wrk; fi; }

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
