#!/usr/bin/env bash
# The prepared GPU check: on a machine with one NVIDIA GPU and a fresh Python (>= 3.10), install the project with a
# CUDA build of torch, run the device-parametrised tests on CUDA, then time one bf16 training step of every arm
# (benchmarks/gpu_step.py) and write docs/benchmarks_gpu.json + docs/benchmarks_gpu.md.
#
# Usage: bash benchmarks/gpu_check.sh [venv dir, default .venv-gpu]
#   TORCH_SPEC   torch requirement (default "torch==2.13.0": PyPI's Linux wheel is the CUDA build)
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL   as usual for pip (e.g. a CUDA wheel index or a local mirror)
#   SKIP_INSTALL=1   use the Python already on PATH (torch with CUDA and the project installed)
#
# Time budget (< 8 minutes): install about a minute with a warm pip cache; tests <= 150 s; timing <= 270 s
# (7 arms, 3 warm-up + 10 timed steps each; no arm is started after 200 s).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
venv=${1:-.venv-gpu}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    python3 -m venv "$venv"
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    python -m pip install -q --upgrade pip
    python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    python -m pip install -q -e ".[test]"
fi
python - <<'PY'
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device (a CPU build?)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PY
echo "install: $(( $(date +%s) - start )) s"

# every numerical test parametrised over the device, on CUDA only (their CPU cases run in CI)
DERS_TEST_DEVICES=cuda timeout 150 python -m pytest -p no:warnings -q -k cuda \
    tests/test_layer_reference.py tests/test_grouped_path.py tests/test_lowrank_fast_path.py tests/test_decode.py \
    tests/test_router_loss.py tests/test_quantized.py tests/test_sync_free.py tests/test_compile.py
echo "tests: $(( $(date +%s) - start )) s"

timeout 270 python benchmarks/gpu_step.py --device cuda --out-dir docs --reps 10 --warmup 3 --budget-s 200
echo "total: $(( $(date +%s) - start )) s"
