# terra_nb developer commands. Needs only python3 (>= 3.11) and make; everything else is
# installed into .venv, re-installed only when pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.terra_nb-installed

.PHONY: setup demo lab test bench lint extension browser

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

# The inspector's JS bundle (committed, so pip needs no node): rebuilt when its sources change.
EXT_SRC := $(wildcard extension/src/*) extension/build.mjs extension/package-lock.json
BUNDLE := terra_nb/static/inspector.js terra_nb/static/inspector.css

extension: $(BUNDLE)

extension/node_modules/.package-lock.json: extension/package-lock.json
	cd extension && npm ci --no-audit --no-fund

$(BUNDLE) &: $(EXT_SRC) extension/node_modules/.package-lock.json
	cd extension && npm run build

# The real-browser tests (tests/test_browser.py) drive Debian's chromium; Playwright cannot
# download its own browser here. Installed with apt-get when missing (needs root, as in CI).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		apt-get update && apt-get install -y --no-install-recommends chromium \
			fonts-liberation fonts-liberation2 fonts-noto-core; \
	fi

# pytest exits 5 when it collects no tests; that is a failure, and we say so.
test: $(STAMP) browser
	@status=0; $(PY) -m pytest || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: FAILED: pytest collected no tests (exit 5)"; fi; \
	exit $$status

bench: $(STAMP)
	$(PY) -m benchmarks
	$(PY) -m benchmarks.warmup --out benchmarks/results
	$(PY) -m benchmarks.distribute --out benchmarks/results

lint: $(STAMP)
	$(VENV)/bin/ruff check .
