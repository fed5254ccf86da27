#!/usr/bin/env bash
# The GPU run on a lent machine (README, "On a GPU"): from the repository root, with .whl/ (benchmarks/gpu_wheels.sh)
# carried. Installs the wheels beside the image's packages, builds the packing extension in place, then runs
# benchmarks/gpu_e2e.py within its budget; everything it writes goes to $OUT (the device tool brings it back).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 SRPPO_FAST_GIT_SHA=$(cat .whl/GIT_SHA)
python3 setup.py -q build_ext --inplace > "$OUT/build_ext.log" 2>&1 || { tail -20 "$OUT/build_ext.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/nvidia_smi.csv"
python3 -c "import torch, transformers, deepspeed, trl; print('torch', torch.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__, 'trl', trl.__version__)" || exit 1
timeout "${E2E_TIMEOUT:-510}" python3 benchmarks/gpu_e2e.py --out "$OUT/gpu_e2e.csv" --budget "${E2E_BUDGET:-480}" "$@" 2>&1 | tee "$OUT/gpu_e2e.log"
