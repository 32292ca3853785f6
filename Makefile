# celeriac: `make demo` runs the demo on the embedded SQLite broker, `make test` the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint typecheck unit bench soak clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py

lint: install
	$(VENV)/bin/ruff check celeriac tests bench examples

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(VENV)/bin/pytest

test: lint typecheck unit

bench: install
	$(PY) bench/bench.py

soak: install
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
