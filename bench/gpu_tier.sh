#!/usr/bin/env bash
# The whole GPU tier in one command on a lent GPU machine (the image has torch+cu130, triton, CuPy,
# nvcc, onnx, onnxruntime, safetensors, transformers, pytest-xdist, pytest-timeout; no network, and
# not the oracles/peers below).
#
# Here, once (pure-Python wheels for the oracles and benchmark peers, carried as .whl):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       xlstm==2.0.6 mlstm_kernels==2.0.6 flashrnn==1.0.8 dacite omegaconf antlr4-python3-runtime
# There (device run with carry [".whl"], timeout_s 600):
#   bash bench/gpu_tier.sh
# Without .whl the TFLA / FlashRNN columns say "not installed" and the official-model test skips.
#
# Steps, in order of value, each under its own cap (seconds) and all under one budget
# (GPU_TIER_BUDGET, default 530: the device call's limit is 600), so that one slow step cannot take
# the others' time; a step that would get under 20 s is skipped and said so:
#   tests_triton   pytest -m gpu: the Triton kernels compiled (mLSTM, sLSTM; xdist workers compile
#                  in parallel, ~60 kernel variants)                                     cap 150
#   tests_plugins  pytest -m gpu: the CUDA plugin kernels through CuPy (CUDA_LAUNCH_BLOCKING=1, so
#                  a bad launch fails its own test)                                       cap 70
#   bench_mlstm    bench/kernels_mlstm.py: ours vs TFLA, the anchor lengths first        cap 100
#   bench_slstm    bench/kernels_slstm.py: ours vs FlashRNN triton and the reference      cap 70
#   bench_plugins  bench/plugins.py: CUDA plugin kernels vs Triton                        cap 60
#   tests_other    pytest -m gpu on the other files (the official sLSTM CUDA kernel is
#                  compiled by torch on first use: minutes)                              cap 120
#   bench_flashrnn_cuda  FlashRNN's CUDA backend (nvcc builds it on first use: minutes),
#                  only where flashrnn imports                                            the rest
# Caps: GPU_TIER_CAPS="150 70 100 70 60 120" overrides the first six. Each bench appends its table
# to bench/RESULTS.md even when its cap stops it (SIGTERM: the rows measured so far, "PARTIAL").
#
# Writes under $OUT (or ./gpu-tier-out), at most 6 files (the device returns 8): setup.log
# (GPU, versions, installs, PTX build), tests.log, bench.log, steps.txt (each step's exit status
# and time), RESULTS.md (the whole file) and RESULTS.new.md (only what this run appended). Both
# RESULTS files are copied after every step, so what finished comes back even if a later step
# does not.
set -uo pipefail
OUT=${OUT:-gpu-tier-out}
BUDGET=${GPU_TIER_BUDGET:-530}
read -r CAP_TRITON CAP_PLUGINS CAP_MLSTM CAP_SLSTM CAP_BENCH_PLUGINS CAP_OTHER <<< "${GPU_TIER_CAPS:-150 70 100 70 60 120}"
START=$SECONDS
mkdir -p "$OUT"
: > "$OUT/steps.txt"
export PYTHONUNBUFFERED=1
RESULTS_START=$(wc -c < bench/RESULTS.md)

save_results() {
    cp bench/RESULTS.md "$OUT/RESULTS.md"
    tail -c +$((RESULTS_START + 1)) bench/RESULTS.md > "$OUT/RESULTS.new.md"
}

# ---- setup: one log; a brace group (not a pipe) so that its exports stay in this shell
{
    echo "== $(date -u +%FT%TZ) on ${HOSTNAME:-?}, $(nproc) CPUs"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi failed"
    if compgen -G ".whl/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
            && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    # xlstm_export.kernels / .models / .plugins are the top-level folders (pyproject's package-dir):
    # an editable install maps them; where it fails, links inside xlstm_export/ do (this checkout is
    # a throw-away copy)
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
        || echo "editable install failed; linking the subpackages instead"
    if ! python3 -c "import xlstm_export.kernels, xlstm_export.plugins, xlstm_export.models" 2>/dev/null; then
        for d in models kernels plugins; do [ -e "xlstm_export/$d" ] || ln -s "../$d" "xlstm_export/$d"; done
        export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    fi
    python3 - <<'EOF'
import importlib
for name in ("torch", "triton", "cupy", "cuda.bindings", "xlstm_export.kernels", "xlstm_export.plugins",
             "mlstm_kernels", "flashrnn", "xlstm", "xdist", "pytest_timeout"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:22s} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name:22s} NOT IMPORTABLE: {type(exc).__name__}: {exc}")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
    nvcc --version | tail -2
    python3 -m xlstm_export.plugins.build || echo "PTX build failed (the plugin tests will say why)"
} > "$OUT/setup.log" 2>&1
cat "$OUT/setup.log"

PYTEST=(python3 -m pytest -m gpu -q -rfEs --tb=short --durations=10 -p no:cacheprovider)
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 4) || XDIST=()
python3 -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout=120) || PER_TEST=()

step() {  # step NAME CAP LOG COMMAND...: run under min(CAP, budget left), log, record the exit status
    local name=$1 cap=$2 log=$3 start=$SECONDS
    shift 3
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "$name skipped: ${left} s of the ${BUDGET} s budget left" | tee -a "$OUT/steps.txt"
        return
    fi
    echo "=== $name (limit $limit s): $*" | tee -a "$OUT/$log"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    local why=""
    [ "$rc" = 124 ] && why=", timed out"
    [ "$rc" = 137 ] && why=", killed"
    echo "$name rc=$rc ($((SECONDS - start)) s of $limit s$why)" | tee -a "$OUT/steps.txt"
    save_results
}

KERNEL_TESTS=(tests/test_mlstm_triton.py tests/test_slstm_triton.py)
PLUGIN_TESTS=(tests/test_plugins_gpu.py)
step tests_triton "$CAP_TRITON" tests.log "${PYTEST[@]}" "${XDIST[@]}" "${PER_TEST[@]}" "${KERNEL_TESTS[@]}"
step tests_plugins "$CAP_PLUGINS" tests.log env CUDA_LAUNCH_BLOCKING=1 "${PYTEST[@]}" "${PER_TEST[@]}" \
    "${PLUGIN_TESTS[@]}"
step bench_mlstm "$CAP_MLSTM" bench.log python3 bench/kernels_mlstm.py --seq-lens 8192,65536,2048,16384,4096,32768 \
    --write bench/RESULTS.md
step bench_slstm "$CAP_SLSTM" bench.log python3 bench/kernels_slstm.py --backends ours flashrnn_triton torch \
    --write bench/RESULTS.md
step bench_plugins "$CAP_BENCH_PLUGINS" bench.log python3 bench/plugins.py --write bench/RESULTS.md
OTHER_IGNORES=()
for f in "${KERNEL_TESTS[@]}" "${PLUGIN_TESTS[@]}"; do OTHER_IGNORES+=(--ignore="$f"); done
step tests_other "$CAP_OTHER" tests.log "${PYTEST[@]}" "${PER_TEST[@]/120/300}" --continue-on-collection-errors \
    "${OTHER_IGNORES[@]}" tests
if python3 -c "import flashrnn" 2>/dev/null; then
    step bench_flashrnn_cuda "$BUDGET" bench.log python3 bench/kernels_slstm.py --backends ours flashrnn_cuda \
        --head-dims 128 --seq-lens 1024 4096 --write bench/RESULTS.md
fi
save_results
echo "gpu tier done in $((SECONDS - START)) s; files in $OUT"
