#!/usr/bin/env bash
# The whole GPU run in one go, on the GPU machine: install, build a random-weight Llama-3.1-8B
# checkpoint, compile it for CUDA, test the kernels, benchmark decode against HF, write results.
#   LAYERS=4 bash bench/gpu.sh        # quick iteration on fewer layers
#   BENCH=0 bash bench/gpu.sh         # build and test only
# Results land in $RESULTS (default bench/results); work files in $WORK, reused while they exist.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${LAYERS:-32}
WORK=${WORK:-/tmp/llama-aot-bench}
RESULTS=${RESULTS:-bench/results}
BATCH=${BATCH:-1,8,32}
CONTEXT=${CONTEXT:-128,2048,8192}
# The image's default g++ builds AOTInductor libraries that segfault at load (see DEVICE.md).
export CXX=/usr/bin/g++ CC=/usr/bin/gcc PYTHONUNBUFFERED=1
stage() { echo "=== $1 ($(date +%T))"; }

stage install
python3 -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

stage "kernel tests"
python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_kernels.py

CKPT=$WORK/llama-3.1-8b-random-$LAYERS
ART=$WORK/artifact-$LAYERS
if [[ ! -f $CKPT/config.json ]]; then
  stage "random checkpoint ($LAYERS layers)"
  python3 -m llama_aot.bench.random_checkpoint "$CKPT" --layers "$LAYERS"
fi

stage "llama-compile --target cuda"
start=$(date +%s)
llama-compile --model "$CKPT" --target cuda --dtype bfloat16 -o "$ART"
echo "compile wall time: $(( $(date +%s) - start )) s"

[[ ${BENCH:-1} == 0 ]] && { stage done; exit 0; }
stage "llama-bench decode"
llama-bench decode --artifact "$ART" --checkpoint "$CKPT" --batch "$BATCH" --context "$CONTEXT" \
  --model-name "llama-3.1-8b$([[ $LAYERS != 32 ]] && echo "-${LAYERS}layers")" --out-dir "$RESULTS"
stage done
