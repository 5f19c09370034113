# Every target runs from .venv, which is built from the pinned files on first use and rebuilt
# whenever one of them is newer than the stamp left by the last install. The profiler library
# (asgi-pprof/) is installed from its folder, not in editable mode, as users get it: it is
# installed again whenever one of its files changes. Scripts run with the project root on
# PYTHONPATH, so they import `app` and `tests.service` as the tests do.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LIBRARY := asgi-pprof
LIBRARY_STAMP := $(VENV)/.installed-$(LIBRARY)
# Not what building it leaves in src/ (*.egg-info), which would make every run reinstall it.
LIBRARY_FILES := $(shell find $(LIBRARY)/pyproject.toml $(LIBRARY)/setup.py $(LIBRARY)/src \
	-type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' 2>/dev/null)
PINNED := requirements.txt requirements-dev.txt pyproject.toml
BENCHMARKS := $(sort $(wildcard benchmarks/*.py))

.PHONY: venv demo test test-pythons serve docs bench

venv: $(LIBRARY_STAMP)

# pip installs over an existing .venv: delete .venv to drop a package the lock no longer has.
# Doubly quiet: errors only (pip and setuptools warn on every editable install).
$(STAMP): $(PINNED)
	@echo "== installing the pinned packages into $(VENV) (about half a minute the first time)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP) $(LIBRARY_STAMP)

$(LIBRARY_STAMP): $(STAMP) $(LIBRARY_FILES)
	@echo "== installing the profiler library from $(LIBRARY)/ (compiles its C extension)"
	$(BIN)/python -m pip install --quiet --quiet --disable-pip-version-check --no-deps \
		--force-reinstall ./$(LIBRARY)
	touch $(LIBRARY_STAMP)

demo: venv
	$(BIN)/leaker demo $(DEMO_ARGS)

# The library's suite runs on its own, from its folder, as it would outside this repository.
# Every step runs even if one before it failed, and the last lines recap them all
# (scripts/run_tests.sh); the target fails if any step did.
test: venv
	@bash scripts/run_tests.sh \
		"ruff check" '$(BIN)/ruff check .' \
		"ruff format" '$(BIN)/ruff format --check .' \
		"project tests" '$(BIN)/pytest $(PYTEST_ARGS)' \
		"library tests" 'cd $(LIBRARY) && ../$(BIN)/pytest $(PYTEST_ARGS)'

# The library's suite on every Python it supports, each in a venv of its own as a user installs
# it (3.11 to 3.14, free-threaded 3.13t): .ci/pythons finds or builds them (root, for 3.13t and
# 3.14), .ci/library-on-pythons runs them. `make test-pythons PYTHONS="3.13t 3.14"` runs some.
test-pythons:
	.ci/library-on-pythons $(PYTHONS)

serve: venv
	$(BIN)/leaker serve $(SERVE_ARGS)

docs: venv
	PYTHONPATH=. $(BIN)/python scripts/make_docs.py

bench: venv
	@test -n "$(BENCHMARKS)" || { echo "no benchmarks/*.py to run" >&2; exit 1; }
	@set -e; for script in $(BENCHMARKS); do \
		echo "== $$script"; \
		PYTHONPATH=. $(BIN)/python $$script; \
	done
