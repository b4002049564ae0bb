# Set-up, run and test targets. Everything the project needs is installed from here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: setup run run-vit flower-demo test lint docs docs-serve dist bench clean

# torch first, pinned: an unpinned torch (directly or via another package) pulls a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test,flower,dp,tracking,docs]'
	@# fashion-mnist comes from a Debian package fetched with `apt-get download`: make sure the
	@# package lists know it (a fresh machine may have empty lists; needs root, else skipped)
	-@command -v apt-cache >/dev/null && { apt-cache show dataset-fashion-mnist >/dev/null 2>&1 \
		|| apt-get update -qq >/dev/null 2>&1 || echo "note: apt-get update failed; fashion-mnist may not fetch"; }
	touch $(STAMP)

setup: $(STAMP)

# `--config configs/NAME.yaml` below reads the config shipped in the package
# (src/rblora/configs/NAME.yaml; `rblora configs` lists them).

# The main job: embedded data for 10 clients (small sizes: a 2-core CPU trains ~200 tokens/s),
# then RB-LoRA for 3 rounds on SmolLM2-135M-Instruct (configs/embedded.yaml).
RUN_SIZES ?= 16,16,24,24,32,32,40,40,48,48
RUN_TASKS ?= sst2,rte,mrpc,boolq
run: setup
	$(PY) prepare_data.py 10 2 --source mixture --tasks $(RUN_TASKS) --per_task 200 \
		--client_sizes $(RUN_SIZES) --test_per_category 50 --overwrite
	$(PY) train.py --config configs/embedded.yaml --overwrite

# The vision job: DINOv2 ViT-S/14 (embedded) on Fashion-MNIST, 10 label-skewed clients
# (Dirichlet 0.5, 2,000 training images), RB-LoRA with the seed's ranks, 3 rounds at 112 px
# (configs/vit_embedded.yaml); then the head-only baseline with the same steps.
run-vit: setup
	$(PY) prepare_data.py 10 --source fashion-mnist --partition dirichlet --alpha 0.5 \
		--pool_size 2000 --test_per_category 100 --output_dir ./data/fashion-mnist --overwrite
	$(PY) train.py --config configs/vit_embedded.yaml --overwrite
	$(PY) train.py --config configs/vit_embedded.yaml --head_only \
		--output_dir ./outputs/vit_head_only --overwrite

# Flower across processes: a SuperLink and three SuperNodes on 127.0.0.1 (free ports), a tiny
# 3-client language-model run on the embedded model submitted with `flwr run`, then all stopped.
flower-demo: setup
	$(PY) prepare_data.py 3 2 --source mixture --client_sizes 8,8,8 --test_per_category 2 \
		--output_dir ./data/flower-demo --overwrite
	$(PY) -m rblora.flower.local -- --config configs/embedded.yaml --num_clients 3 \
		--client_ranks 4,8,16 --num_communication_rounds 2 --data_path ./data/flower-demo \
		--output_dir ./outputs/flower-demo --eval_mmlu_size 0 --overwrite --no_progress

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The documentation site (mkdocs.yml, docs/) into site/, strictly: a broken link or anchor, a page
# missing from the nav or an API reference that does not resolve fails the build. CI runs it.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# A wheel in dist/ (configs and the Flower App description are package data; tests/test_wheel.py
# installs one into a fresh venv). `python -m build` gives the same wheel and an sdist.
dist: setup
	$(PY) -m pip wheel --no-deps --no-build-isolation -q -w dist .

bench: setup
	$(PY) benchmarks/bench_aggregation.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache site dist build
