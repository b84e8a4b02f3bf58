#!/usr/bin/env bash
# The GPU check (one H100/H200, < 8 min): the step-cost curve T=1..128 for SmolLM2-135M and for a Llama-3.1-8B-shaped
# random-weight model (bf16; eager over the whole curve, compiled at a few sizes), then SmolLM2 end to end with
# trained heads when a training run is given. Every result is a JSON file under OUT.
#
#   bash benchmarks/gpu_check.sh [OUT]                         # on the GPU machine
#   MEDUSA_RUN=output/smollm2_135m_medusa bash benchmarks/gpu_check.sh   # + end to end with those trained heads
#   DRY_RUN=1 bash benchmarks/gpu_check.sh output/gpu_check_dry       # CPU, tiny sizes (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-output/gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
if [[ ${DRY_RUN:-0} == 1 ]]; then
  device=cpu; models=(tiny); curve=1,2,4; compiled=1,4; ctx=16; repeats=2; threads=1
else
  device=cuda; models=(smollm2-random llama8b-random); curve=1,2,4,8,16,32,64,128; compiled=1,16,64; ctx=1024
  repeats=7; threads=auto
fi
start=$(date +%s)
for model in "${models[@]}"; do
  common=(--model "$model" --device "$device" --dtype bfloat16 --context-len "$ctx" --repeats "$repeats" --threads "$threads")
  $py benchmarks/step_cost.py "${common[@]}" --compile off --sizes "$curve" --out "$out/step_cost_${model}_eager.json"
  $py benchmarks/step_cost.py "${common[@]}" --compile on --sizes "$compiled" --out "$out/step_cost_${model}_compiled.json"
done
if [[ ${DRY_RUN:-0} == 1 ]]; then
  e2e=(--model tiny --num-heads 2 --num-prompts 2 --max-new-tokens 12 --step-sizes 1,4 --context-len 16 --threads 1
       --trees chain1 --quality-prompts 2)
elif [[ -n ${MEDUSA_RUN:-} ]]; then
  e2e=(--model checkpoint --checkpoint "$MEDUSA_RUN" --num-prompts 8 --max-new-tokens 128 --step-sizes 1,4,16,64)
else
  e2e=()
  echo "gpu_check: no MEDUSA_RUN (a medusa_finetune output dir): skipping the end-to-end run with trained heads"
fi
if [[ ${#e2e[@]} -gt 0 ]]; then
  $py benchmarks/bench_decode.py "${e2e[@]}" --device "$device" --dtype bfloat16 --compile on --out "$out/e2e"
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s; results in $out"
