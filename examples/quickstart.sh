#!/usr/bin/env bash
# The main job on the embedded tiny default, on a CPU: build sophia-tiny and a synthetic video QA dataset,
# train stage 1 (new modules) and stage 2 (full), then answer questions about held-out videos.
#   bash examples/quickstart.sh [WORK_DIR]     (default: output/quickstart)
set -euo pipefail
WORK="${1:-output/quickstart}"
PLUGIN="$(sophia plugin-path)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CPU=(--fp16 false --bf16 false --check_model false --dataloader_num_workers 0 --report_to none
     --split_dataset_ratio 0 --gradient_checkpointing false --add_version false --save_only_model false)
start=$SECONDS
step() { printf '\n==> [%3ds] %s\n' "$((SECONDS - start))" "$*"; }

step "1/5 building sophia-tiny (random weights, offline tokenizer)"
rm -rf "$WORK"
sophia build-tiny "$WORK/sophia-tiny"

step "2/5 writing the synthetic video QA dataset (mp4 clips + jsonl)"
sophia make-data "$WORK/data" --num-train 128 --num-val 16

step "3/5 stage 1: aligning the new modules (projector + aggregation CNN), everything else frozen"
swift sft --model "$WORK/sophia-tiny" --model_type sophia --external_plugins "$PLUGIN" \
    --dataset "$WORK/data/train.jsonl" --output_dir "$WORK/stage1" "${CPU[@]}" \
    --tuner_type full --freeze_vit true --freeze_llm true --freeze_aligner false \
    --learning_rate 3e-4 --lr_scheduler_type constant --num_train_epochs 1 \
    --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --logging_steps 4 --save_strategy epoch

step "4/5 stage 2: joint fine-tuning (all modules)"
swift sft --model "$WORK/stage1/last-checkpoint" --external_plugins "$PLUGIN" \
    --dataset "$WORK/data/train.jsonl" --output_dir "$WORK/stage2" "${CPU[@]}" \
    --tuner_type full --freeze_vit false --freeze_llm false --freeze_aligner false \
    --learning_rate 2e-3 --warmup_ratio 0.05 --num_train_epochs 8 \
    --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --logging_steps 8 \
    --save_strategy epoch --save_total_limit 1

step "5/5 answering questions about held-out videos"
swift infer --model "$WORK/stage2/last-checkpoint" --val_dataset "$WORK/data/val.jsonl" \
    --infer_backend transformers --max_new_tokens 4 --max_batch_size 8 --result_path "$WORK/answers.jsonl"

python - "$WORK/answers.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first = rows[0]
print("\nvideo:    ", first["videos"][0])
print("question: ", first["messages"][0]["content"].replace("<video>", ""))
print("answer:   ", first["response"].strip(), f"(truth: {first['labels']})")
right = sum(r["response"].strip() == r["labels"].strip() for r in rows)
print(f"held-out accuracy: {right}/{len(rows)} (chance is about 1 in 6)")
PY
step "done: checkpoints in $WORK/stage1 and $WORK/stage2, answers in $WORK/answers.jsonl"
