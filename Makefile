# terra_nb developer commands. Needs only python3 (>= 3.11) and make; everything else is
# installed into .venv, re-installed only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.terra_nb-installed

.PHONY: setup demo lab test bench lint

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) demo_notebooks/run_demo.py

lab: $(STAMP)
	$(VENV)/bin/jupyter lab demo_notebooks/

# pytest exits 5 when it collects no tests; that is a failure, and we say so.
test: $(STAMP)
	@status=0; $(PY) -m pytest || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: FAILED: pytest collected no tests (exit 5)"; fi; \
	exit $$status

bench: $(STAMP)
	$(PY) -m benchmarks

lint: $(STAMP)
	$(VENV)/bin/ruff check .
