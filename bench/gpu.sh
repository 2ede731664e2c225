#!/usr/bin/env bash
# The whole GPU run, on the GPU machine: install, test the kernels and time attention alone, build
# a random-weight Llama-3.1-8B checkpoint, compile it for CUDA in bf16 (and in fp32 for the parity
# check, in parallel), time the first token, check fp32 parity with HF, run the serving sweep, and
# benchmark decode against HF with a profile of the step.
#   LAYERS=4 bash bench/gpu.sh          quick iteration on fewer layers
#   TESTS=0 PARITY=0 SWEEP=0 bash ...   skip stages
#   BUILD=0 bash bench/gpu.sh           kernel tests and the kernel tables only (~6 minutes)
#   FP8=0 bash ...                      without the FP8 artifacts (FP8_VARIANTS="fp8-kv": only the one with both) (--fp8, and --fp8 with the FP8 KV cache),
#                                       "fp8-kv-lm" adds --fp8-lm-head to the latter,
#                                       which otherwise are timed and swept next to the bf16 one
#   KERNEL_TABLES=0 bash ...            without the attention and matmul tables
#   EAGLE=1 bash ...                    also (off by default) give the checkpoint a random EAGLE-3 head
#                                       (random_checkpoint --eagle-head), build it in with llama-compile
#                                       --speculative-algorithm EAGLE3, and time a decode step, a verify step and
#                                       the draft calls at batch 1 with the projected speed-up (llama-bench
#                                       speculative --step-costs), right after the checkpoint; EAGLE=only stops
#                                       there (with TESTS=0 KERNEL_TABLES=0: install, checkpoint, build, timing)
#   PROFILE="1:128 8:1024" bash ...     profile each artifact's step at these batch:context points (default 1:128)
#   SEQS=64 TOKENS=512 bash ...         sequences and tokens per step the bf16 artifact is built for
#                                       (default: llama-compile's for cuda, 128 and 2048)
#   SCENARIOS=random-1000-1000-c100,sharegpt-100 bash ...   some sweep scenarios, in this order
#   BASELINE_TREES=".trees/main .trees/b" bash ...   also build an artifact from each of these source
#                                       trees and time them all in alternating rounds: the first tree's
#                                       twice (how much two copies of one program differ), the others',
#                                       then this tree's, each against the first. This tree's ops must
#                                       cover theirs. Prepare each here with `mkdir -p .trees/main && git
#                                       archive main | tar -x -C .trees/main && git rev-parse main >
#                                       .trees/main/GIT_SHA`, and carry .trees.
# What the machine cannot fetch comes from $INPUTS (default .device-inputs; prepare it here with
# `python -m llama_aot.bench.device_inputs .device-inputs` and carry it): Meta's Llama 3 tokenizer
# and a ShareGPT subset. Without it the checkpoint gets a byte-level stand-in tokenizer and the
# parity and sweep stages are skipped. Also carry .wheels (`../shared/device/wheelhouse.sh uvloop httptools xgrammar`) for
# the server's web stack.
# The full run takes ~19 minutes on an H200 (the sweep ~10), past one device call's 10: start it detached
#   setsid bash bench/gpu.sh > /tmp/gpu.log 2>&1 < /dev/null &
# and read /tmp/gpu.log from the following calls. Results land in $RESULTS, work files in $WORK.
# The log's last line is always "=== done (+N s, exit S)", a failed stage's too: wait for it.
set -uo pipefail
cd "$(dirname "$0")/.."
LAYERS=${LAYERS:-32}
WORK=${WORK:-/tmp/llama-aot-bench}
RESULTS=${RESULTS:-bench/results}
INPUTS=${INPUTS:-.device-inputs}
source bench/device_env.sh
NAME="llama-3.1-8b$([[ $LAYERS != 32 ]] && echo "-${LAYERS}layers")"
CKPT=$WORK/$NAME-random ART=$WORK/$NAME-cuda ART32=$WORK/$NAME-cuda-fp32

stage install
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
[[ -d .wheels ]] && python3 -m pip install -q --no-index --find-links .wheels fastapi uvicorn openai gguf jinja2 xgrammar \
  partial-json-parser uvloop httptools
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
lscpu | grep -E '^(Model name|CPU\(s\)):'

if [[ ${TESTS:-1} == 1 ]]; then
  stage "kernel tests"
  # A kernel that fails here would fail the builds too: stop before spending device time on them.
  python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_kernels.py tests/test_fused_kernels.py \
    tests/test_decode_linear.py tests/test_fp8_rows_kernel.py || exit 1
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_decode_graphs.py tests/test_weights_loader.py \
    tests/test_sampling.py  # the files with gpu-marked tests; others import packages the image lacks
fi
if [[ ${KERNEL_TABLES:-1} == 1 ]]; then
  stage "attention kernel alone (decode and mixed steps, by split count and tile shape)"
  python3 -m llama_aot.bench.attention --out-dir "$RESULTS"
  stage "decode matmuls alone (cuBLAS against decode_linear's tiles) and the greedy argmax"
  python3 -m llama_aot.bench.matmul --out-dir "$RESULTS"
  stage "FP8 weight matmuls: each mode checked, then timed against bf16 (what --fp8 would choose here)"
  python3 -m llama_aot.bench.fp8_matmul --out-dir "$RESULTS"
fi

[[ ${BUILD:-1} == 1 ]] || exit 0

[[ -f $INPUTS/tokenizer.json ]] && TOKENIZER=(--tokenizer "$INPUTS/tokenizer.json") || TOKENIZER=()
if [[ ! -f $CKPT/config.json ]]; then
  stage "random checkpoint ($LAYERS layers)"
  python3 -m llama_aot.bench.random_checkpoint "$CKPT" --layers "$LAYERS" "${TOKENIZER[@]}" || exit 1
fi

if [[ ${EAGLE:-0} != 0 ]]; then
  HEAD=$WORK/$NAME-random-eagle3-head
  stage "random EAGLE-3 head, llama-compile --target cuda --speculative-algorithm EAGLE3"
  [[ -f $HEAD/config.json ]] || python3 -m llama_aot.bench.random_checkpoint "$CKPT" --eagle-head "$HEAD" || exit 1
  start=$(date +%s)
  llama-compile --model "$CKPT" --target cuda --speculative-algorithm EAGLE3 --speculative-draft-model-path "$HEAD" \
    -o "$ART-eagle3" || exit 1
  echo "compile wall time: $(( $(date +%s) - start )) s"
  stage "EAGLE step costs at batch 1 (decode, verify, draft) and the projected speed-up"
  llama-bench speculative --artifact "$ART-eagle3" --step-costs --out-dir "$RESULTS" || exit 1
  [[ $EAGLE == only ]] && exit 0
fi

PARITY=${PARITY:-1}
[[ -f $INPUTS/sharegpt.json ]] || PARITY=0 SWEEP=0
build_fp32() {
  # Its own Inductor cache: two builds writing one cache directory at once is not known to be safe.
  ( export TORCHINDUCTOR_CACHE_DIR=$WORK/inductor-cache-fp32; start=$(date +%s)
    llama-compile --model "$CKPT" --target cuda --dtype float32 -o "$ART32"
    echo "fp32 compile wall time: $(( $(date +%s) - start )) s" ) > "$WORK/build-fp32.log" 2>&1
  grep -v '\.\.\.$' "$WORK/build-fp32.log" | tail -4
}
# Each build holds its eager model and, while verifying, a second copy of the weights: about
# 64 GB for fp32 and 32 GB for bf16 at once. Only a card with room for both runs them together.
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
PARALLEL=$(( PARITY == 1 && ${GPU_MIB:-0} >= 120000 ))
stage "llama-compile --target cuda (bf16$([[ $PARALLEL == 1 ]] && echo ", fp32 alongside"))"
[[ $PARALLEL == 1 ]] && { build_fp32 & FP32=$!; }
start=$(date +%s)
# If a build with other step sizes fails, the defaults follow, so the rest of the run still has an artifact.
llama-compile --model "$CKPT" --target cuda ${SEQS:+--max-num-seqs "$SEQS"} ${TOKENS:+--max-num-tokens "$TOKENS"} \
  -o "$ART" \
  || { [[ -n ${SEQS:-}${TOKENS:-} ]] && stage "retry with the default sizes" \
       && llama-compile --model "$CKPT" --target cuda -o "$ART"; } \
  || exit 1
echo "compile wall time: $(( $(date +%s) - start )) s"
[[ $PARALLEL == 1 ]] && wait $FP32

FP8_ARTIFACTS=() FP8_PATHS=()
if [[ ${FP8:-1} == 1 ]]; then
  for variant in ${FP8_VARIANTS:-fp8 fp8-kv}; do
    stage "llama-compile --target cuda --$variant"
    flags=(--fp8); [[ $variant == fp8-kv* ]] && flags+=(--kv-cache-dtype fp8_e4m3)
    [[ $variant == fp8-kv-lm ]] && flags+=(--fp8-lm-head)
    [[ -f $INPUTS/sharegpt.json && $variant == fp8-kv* ]] && flags+=(--calibration-data "$INPUTS/sharegpt.json")
    start=$(date +%s)
    llama-compile --model "$CKPT" --target cuda "${flags[@]}" -o "$ART-$variant" || exit 1
    echo "compile wall time: $(( $(date +%s) - start )) s"
    python3 -c "import json, sys; q = json.load(open(sys.argv[1]))['quantization']['quantize_fp8']
print('modes by weight shape:', json.dumps(q['modes_by_weight_shape'], indent=1))" "$ART-$variant/manifest.json"
    FP8_ARTIFACTS+=(--artifact "$ART-$variant") FP8_PATHS+=("$ART-$variant")
  done
fi

ARTIFACTS=()
for tree in ${BASELINE_TREES:-}; do
  # One editable install at a time: each tree's code builds its artifact, then this tree's is back.
  stage "baseline artifact from $tree"
  base_art=$WORK/$NAME-cuda-$(basename "$tree")
  ( cd "$tree" && python3 -m pip install -q --no-deps --no-build-isolation -e . ) \
    && LLAMA_AOT_GIT_SHA=$(cat "$tree/GIT_SHA" 2>/dev/null || echo "unknown-$(basename "$tree")") \
       llama-compile --model "$CKPT" --target cuda -o "$base_art"; built=$?
  python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  [[ $built == 0 ]] || exit 1
  # A tree from before manifest format 3 wrote format 2; this tree's loader reads only format 3.
  grep -q '"format_version": 2' "$base_art/manifest.json" && { python3 -m llama_aot.bench.format2 "$base_art" || exit 1; }
  ARTIFACTS+=(--artifact "$base_art")
  [[ ${#ARTIFACTS[@]} == 2 ]] && ARTIFACTS+=(--artifact "$base_art")  # the first baseline twice
done
ARTIFACTS+=(--artifact "$ART" "${FP8_ARTIFACTS[@]}")

# The stages run from the quickest to the longest, so a run cut short by the device's time keeps
# the most results.
if [[ ${BENCH:-1} == 1 ]]; then
  stage "first token"
  python3 -m llama_aot.bench.first_token "$ART"
fi

if [[ $PARITY == 1 ]]; then
  [[ $PARALLEL == 1 ]] || { stage "llama-compile --target cuda --dtype float32"; build_fp32; }
  stage "fp32 parity with HF"
  llama-bench accuracy --artifact "$ART32" --checkpoint "$CKPT" --prompts 20 --new-tokens 32 \
    --dataset-path "$INPUTS/sharegpt.json" --out-dir "$RESULTS"
  rm -rf "$ART32"  # 32 GB of fp32 weights: give the disk back before serving
fi

if [[ ${BENCH:-1} == 1 ]]; then
  stage "llama-bench decode"
  llama-bench decode "${ARTIFACTS[@]}" --checkpoint "$CKPT" --batch 1 --context 128,8192 --model-name "$NAME" \
    --out-dir "$RESULTS"
  llama-bench decode "${ARTIFACTS[@]}" --batch 8,32 --context 1024 --model-name "$NAME" --out-dir "$RESULTS"
  for point in ${PROFILE:-1:128}; do
    for art in "$ART" "${FP8_PATHS[@]}"; do
      stage "profile $(basename "$art"): batch ${point%:*}, context ${point#*:}"
      python3 -m llama_aot.bench.profile_step "$art" --batch "${point%:*}" --context "${point#*:}"
    done
  done
fi

if [[ ${SWEEP:-1} == 1 ]]; then
  SWEPT=("$ART"); [[ ${FP8:-1} == 1 ]] && SWEPT+=("$ART-fp8-kv")
  for art in "${SWEPT[@]}"; do
    stage "serving sweep: $(basename "$art")"
    llama-serve "$art" --port 8000 --log-level warning &
    SERVER=$!
    until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health')" 2>/dev/null; do
      kill -0 $SERVER 2>/dev/null || exit 1
      sleep 1
    done
    llama-bench sweep --base-url http://127.0.0.1:8000 --tokenizer "$art" --dataset-path "$INPUTS/sharegpt.json" \
      ${SCENARIOS:+--scenarios "$SCENARIOS"} --plot --out-dir "$RESULTS"
    kill $SERVER; wait $SERVER
  done
fi
