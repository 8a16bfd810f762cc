#!/usr/bin/env bash
# The whole GPU tier in one command on a lent GPU machine (the image has torch+cu, triton, CuPy,
# onnx, onnxruntime, safetensors, transformers; not the oracles/peers below).
#
# Here, once (pure-Python wheels for the oracles and benchmark peers, carried as .whl):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       xlstm==2.0.6 mlstm_kernels==2.0.6 flashrnn==1.0.8 dacite omegaconf antlr4-python3-runtime
# There (device run with carry [".whl"], timeout_s 600):
#   bash bench/gpu_tier.sh
# Writes the test log, each step's exit status (steps.txt) and bench/RESULTS.md with the new
# figures under $OUT (or ./gpu-tier-out). Each step has its own time limit (GPU_TIER_LIMITS, in
# seconds: tests, kernel benchmarks, plugin benchmarks) so that one slow step cannot take the
# device call's whole budget, and RESULTS.md is copied out after every step, so what finished
# comes back even if a later step does not.
set -uo pipefail
OUT=${OUT:-gpu-tier-out}
read -r LIMIT_TESTS LIMIT_KERNELS LIMIT_PLUGINS <<< "${GPU_TIER_LIMITS:-240 150 60}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log, record the exit status
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "$name rc=$rc ($((SECONDS - start)) s of $limit s)$([ "$rc" = 124 ] && echo ', timed out')" | tee -a "$OUT/steps.txt"
    cp bench/RESULTS.md "$OUT/RESULTS.md"
}

step gpu_tests "$LIMIT_TESTS" python3 -m pytest -m gpu -q -p no:cacheprovider
step bench_kernels "$LIMIT_KERNELS" python3 bench/kernels.py --write bench/RESULTS.md
step bench_plugins "$LIMIT_PLUGINS" python3 bench/plugins.py --write bench/RESULTS.md
