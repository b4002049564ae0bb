# Set-up, run and test targets. Everything the project needs is installed from here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: setup run test lint bench clean

# torch first, pinned: an unpinned torch (directly or via another package) pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	@# fashion-mnist comes from a Debian package fetched with `apt-get download`: make sure the
	@# package lists know it (a fresh machine may have empty lists; needs root, else skipped)
	-@command -v apt-cache >/dev/null && { apt-cache show dataset-fashion-mnist >/dev/null 2>&1 \
		|| apt-get update -qq >/dev/null 2>&1 || echo "note: apt-get update failed; fashion-mnist may not fetch"; }
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m rblora.cli assets list

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) benchmarks/bench_aggregation.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
