#!/usr/bin/env bash
# What a session with a CUDA machine runs: the GPU tests (native Triton, no interpreter)
# and the GPU benchmarks, against the machine's own torch/triton/transformers, with the
# packages taken from source (PYTHONPATH), so nothing needs installing there.
#
#   bash .ci/gpu.sh [tests|tests-model|bench-attention|tune-tiles|bench-quant|quant-sweep|bench-decode|bench-serve ...]
#
# No argument runs tests then every benchmark. Each step has its own time limit so a
# hung or slow step cannot eat the others; logs go to $OUT (or /tmp/gpu-out).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$(printf '%s:' "$PWD"/packages/*/src)${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
PY=${PY:-python3}

step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    printf '\n=== %s (limit %ss)\n' "$name" "$limit"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 60
    printf '=== %s: exit %s after %ss\n' "$name" "${PIPESTATUS[0]}" $((SECONDS - t0))
}

tests() {
    step tests-kernels 300 $PY -m pytest -p no:cacheprovider -q --maxfail=30 --tb=short -n 8 \
        --deselect packages/ds-attention/tests/test_public_api.py::test_version_matches_metadata \
        packages/ds-attention/tests packages/ds-quant/tests/test_kernels.py \
        packages/ds-lora/tests/test_layer.py
    step tests-gpu-marked 240 $PY -m pytest -p no:cacheprovider -q --tb=short -m gpu \
        packages/ds-model/tests/test_model.py packages/ds-model/tests/test_train_trainer.py \
        packages/ds-model/tests/test_cuda_graph.py \
        packages/ds-optim/tests/test_gpu.py packages/ds-quant/tests
}

bench-attention() {
    step bench-attention 240 $PY packages/ds-attention/benchmarks/bench_gpu.py \
        --seqlens 1024 4096 16384 32768 --repeats 10
}
tune-tiles() {  # a sweep to choose _tiles' defaults from; see its docstring
    step tune-tiles 300 $PY packages/ds-attention/benchmarks/tune_tiles.py
}
bench-quant() { step bench-quant 120 $PY packages/ds-quant/benchmarks/bench_gpu.py; }
quant-sweep() {  # the decode GEMV kernels' BLOCK_N / split-K choices
    step quant-sweep 200 $PY packages/ds-quant/benchmarks/bench_gpu.py --sweep
}
bench-decode() {
    step bench-decode-v3 300 $PY packages/ds-model/benchmarks/bench_gpu_decode.py --arch v3 --compile
    step bench-decode-llama 300 $PY packages/ds-model/benchmarks/bench_gpu_decode.py --arch llama --compile
}
tests-model() {  # the ds-model / ds-lora GPU tests alone
    step tests-model 200 $PY -m pytest -p no:cacheprovider -q --tb=short -m gpu \
        packages/ds-model/tests/test_model.py packages/ds-model/tests/test_cuda_graph.py \
        packages/ds-lora/tests/test_layer.py
}
bench-serve() {
    step bench-serve 180 $PY packages/ds-serve/benchmarks/bench_serve.py --device cuda
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', t.__version__)"
if [ $# -eq 0 ]; then set -- tests bench-attention bench-quant bench-decode; fi
for what in "$@"; do "$what"; done
