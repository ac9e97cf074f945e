# `make demo` and `make test` each work alone on a fresh clone: both create .venv when it is missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

.PHONY: setup system-deps demo test test-fast bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

# Headless Chromium for the playground page test (skipped with a reason when it cannot be installed).
system-deps:
	@command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
	  || echo "note: could not install chromium; the playground browser test will be skipped"; }

demo: setup
	$(PY) pipeline/run.py stage=demo

test: setup system-deps
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf outputs .pytest_cache
