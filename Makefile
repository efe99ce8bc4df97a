# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/refundguard: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

demo: $(BIN)/refundguard
	$(BIN)/refundguard demo

test: $(BIN)/refundguard
	$(BIN)/ruff check .
	$(BIN)/pytest -q

bench: $(BIN)/refundguard
	$(BIN)/refundguard bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .refundguard
