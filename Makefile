# Every target runs from .venv, which is built from the pinned files on first use and rebuilt
# whenever one of them is newer than the stamp left by the last install. Scripts run with the
# project root on PYTHONPATH, so they import `app` and `tests.service` as the tests do.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PINNED := requirements.txt requirements-dev.txt pyproject.toml
BENCHMARKS := $(sort $(wildcard benchmarks/*.py))

.PHONY: venv demo test serve docs bench

venv: $(STAMP)

# pip installs over an existing .venv: delete .venv to drop a package the lock no longer has.
# Doubly quiet: errors only (pip and setuptools warn on every editable install).
$(STAMP): $(PINNED)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/leaker demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest $(PYTEST_ARGS)

serve: $(STAMP)
	$(BIN)/leaker serve $(SERVE_ARGS)

docs: $(STAMP)
	PYTHONPATH=. $(BIN)/python scripts/make_docs.py

bench: $(STAMP)
	@test -n "$(BENCHMARKS)" || { echo "no benchmarks/*.py to run" >&2; exit 1; }
	@set -e; for script in $(BENCHMARKS); do \
		echo "== $$script"; \
		PYTHONPATH=. $(BIN)/python $$script; \
	done
