# Two commands matter: `make run` (set up, then transcribe a sample through the whole pipeline)
# and `make test` (set up, then run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test up clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/jetscribe demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

up: $(BIN)/.installed
	$(BIN)/jetscribe up

clean:
	rm -rf $(VENV) .jetscribe
