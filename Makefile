# Two commands matter: `make run` (set up, then transcribe a sample through the whole pipeline)
# and `make test` (set up, then run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint up clean speakers browser

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Speakers from the audio (the optional `speakers` extra), for the tests and whoever turns it on: torch's CPU build
# first (pinned), so that pip never resolves a multi-GB CUDA build, then the extra. `make run` does without it.
$(BIN)/.speakers: $(BIN)/.installed
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,speakers]'
	touch $@

speakers: $(BIN)/.speakers

run: $(BIN)/.installed
	$(BIN)/jetscribe demo

test: lint browser $(BIN)/.speakers
	$(BIN)/python -m pytest

# The captions page's browser test (tests/e2e/test_captions_page.py) drives Debian's chromium. As root (CI) it is
# installed where missing; elsewhere the test skips saying so, and fails under CI=true.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

# One style (ruff format, 120 columns), lint rules and mypy --strict on shared/ and the pure cores: pyproject.toml.
lint: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

up: $(BIN)/.installed
	$(BIN)/jetscribe up

clean:
	rm -rf $(VENV) .jetscribe
