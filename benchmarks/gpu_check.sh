#!/usr/bin/env bash
# The one prepared GPU check (issue 8): every llmreg trainer beside its stock base trainer on a randomly initialized
# ~0.5B model in bf16 (tokens/s, step-time ratio, peak memory), then a ZeRO-3 run of recipes/sft.py on the one GPU.
# About 8 minutes on one H100. Record the tables in benchmarks/README.md with the card's name (device.txt).
#
#   bash benchmarks/gpu_check.sh                      # results in outputs/gpu_check/
#   SIZE=tiny bash benchmarks/gpu_check.sh            # the script itself, on a CPU, in a few minutes
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
SIZE=${SIZE:-0.5b}
CASES=${CASES:-"sft rpg rspo spin booster vaccine lora_dropout l1 reweight"}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
PRECISION=()
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
    PRECISION=(--bf16)
else
    echo "no GPU: fp32 on the CPU, a check of this script only" | tee "$OUT/device.txt"
fi

python benchmarks/random_model.py --size "$SIZE" --output-dir "$OUT/model"

# shellcheck disable=SC2086  # CASES is a list
python benchmarks/run.py --model "$OUT/model" "${PRECISION[@]}" --cases $CASES \
    --rounds 3 --steps-per-round 5 --warmup 3 2>&1 | grep -E '^(\||device|peak)' | tee "$OUT/trainers.md"

ZERO3=(--model_name_or_path "$OUT/model" --dataset_name llmreg/arithmetic --max_steps 10 --logging_steps 5
       --per_device_train_batch_size 16 --max_length 128 --save_strategy no --report_to none
       --output_dir "$OUT/zero3_sft")
if [ ${#PRECISION[@]} -eq 0 ]; then ZERO3+=(--bf16 false); else ZERO3+=(--bf16 true); fi
accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 1 recipes/sft.py \
    "${ZERO3[@]}" 2>&1 | grep -E "train_runtime|train_loss|Error" | tee "$OUT/zero3.txt"
echo "done: $OUT/trainers.md, $OUT/zero3.txt"
