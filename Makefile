# smimeproxy developer commands. `make install` once, then `make test`.
PYTHON ?= python3

.PHONY: install test check format demo bench

install:
	$(PYTHON) -m pip install -e '.[dev]' --config-settings editable_mode=compat

test:
	$(PYTHON) -m pytest -q

check:
	$(PYTHON) -m ruff check smimeproxy tests bench twisted
	$(PYTHON) -m ruff format --check smimeproxy tests bench twisted

format:
	$(PYTHON) -m ruff format smimeproxy tests bench twisted
	$(PYTHON) -m ruff check --fix smimeproxy tests bench twisted

demo:
	$(PYTHON) -m pip install -q -e . --config-settings editable_mode=compat
	$(PYTHON) -m smimeproxy.demo

bench:
	$(PYTHON) bench/engine.py
	$(PYTHON) bench/keystore.py
	$(PYTHON) bench/archive.py
