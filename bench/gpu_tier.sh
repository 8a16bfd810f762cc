#!/usr/bin/env bash
# The whole GPU tier in one command on a lent GPU machine (the image has torch+cu, triton, CuPy,
# onnx, onnxruntime, safetensors, transformers; not the oracles/peers below).
#
# Here, once (pure-Python wheels for the oracles and benchmark peers, carried as .whl):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       xlstm==2.0.6 mlstm_kernels==2.0.6 flashrnn==1.0.8 dacite omegaconf antlr4-python3-runtime
# There (device run with carry [".whl"]):
#   bash bench/gpu_tier.sh
# Writes the test log and the updated bench/RESULTS.md under $OUT (or ./gpu-tier-out).
set -uo pipefail
OUT=${OUT:-gpu-tier-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || export PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

python3 -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
python3 bench/kernels.py --write bench/RESULTS.md 2>&1 | tee "$OUT/bench_kernels.log"
python3 bench/plugins.py --write bench/RESULTS.md 2>&1 | tee "$OUT/bench_plugins.log"
cp bench/RESULTS.md "$OUT/RESULTS.md"
