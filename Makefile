# The two commands of the README: `make demo` and `make test`. Both set everything up first.
VENV ?= .venv

.PHONY: setup demo test lint bench-quick

setup:
	bash scripts/setup.sh $(VENV)

demo: setup
	$(VENV)/bin/regrow demo

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests bench

bench-quick: setup
	$(VENV)/bin/python bench/baselines.py --quick
	$(VENV)/bin/python bench/overhead.py --quick
