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

# The main job: embedded data for 10 clients (small sizes: a 2-core CPU trains ~200 tokens/s),
# then RB-LoRA for 3 rounds on SmolLM2-135M-Instruct (configs/embedded.yaml).
RUN_SIZES ?= 8,8,12,12,16,16,20,20,24,24
run: setup
	$(PY) prepare_data.py 10 2 --source mixture --client_sizes $(RUN_SIZES) \
		--test_per_category 5 --overwrite
	$(PY) train.py --config configs/embedded.yaml --overwrite

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
