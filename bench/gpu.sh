#!/usr/bin/env bash
# The GPU check (issue 14) on the lent H200: installs the carried wheels offline, then runs
# bench/gpu_check.py (DeepSpeed ZeRO-3 training at ~1B, packed vs padded, HF generation) and
# prints its JSON on stdout; logs go to stderr. About 6 minutes. Prepare the wheels here first:
#   make gpu-wheels        # -> bench/gpu-wheels/ (gitignored, ~9 MiB)
# then, with the device tool:  run(command="bash bench/gpu.sh", carry=["bench/gpu-wheels"], timeout_s=480)
# Extra arguments go to gpu_check.py (e.g. --budget 300).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=bench/gpu-wheels
site=${TMPDIR:-/tmp}/gpu-check-site
ls "$wheels"/deepspeed-*.whl >/dev/null || { echo "no DeepSpeed wheel in $wheels: run make gpu-wheels and carry it" >&2; exit 2; }
# --target + PYTHONPATH: the image's packages stay as they are; only what it lacks is added.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl >&2
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export DS_BUILD_OPS=0 PYTHONUNBUFFERED=1  # DeepSpeed compiles nothing: ZeRO-3 with torch's AdamW needs no op
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >&2 || true
exec python3 bench/gpu_check.py --device cuda "$@"
