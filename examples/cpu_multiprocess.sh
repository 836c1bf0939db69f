#!/usr/bin/env bash
# The 8-GPU recipes' multi-process training on CPU processes (gloo), on the tiny default: DDP, DeepSpeed ZeRO-2 or
# ZeRO-3, stage 1, 2 or 3, NPROC processes (default 2). Builds sophia-tiny and a synthetic video QA set first.
#   MODE=ddp|zero2|zero3 STAGE=1|2|3 NPROC=2 bash examples/cpu_multiprocess.sh [WORK_DIR]   (default output/cpu_mp)
# What differs from a GPU cluster (tests/test_distributed.py runs these on every CI build):
#   - DDP needs --use_cpu true: without it every process trains a model of its own and still exits 0.
#   - DeepSpeed takes examples/deepspeed/zero{2,3}_cpu.json: ms-swift's own zero2/zero3 configs without the
#     "train_batch_size" key. With --deepspeed zero2/zero3 on CPU processes DeepSpeed stops at
#     "train_batch_size ... 2 != 2 * 1 * 2" (accelerate counts one process). On GPUs use --deepspeed zero2/zero3.
#   - The first DeepSpeed run on a machine builds DeepSpeed's C++ shared-memory op (about 2 minutes on 2 cores,
#     cached in ~/.cache/torch_extensions). No oneCCL is needed: DeepSpeed's CPU accelerator falls back to gloo.
#   - --ddp_timeout 120: a rank stuck in a collective fails the run instead of waiting (ms-swift's default is
#     18,000,000 s).
set -euo pipefail
MODE="${MODE:-ddp}"
STAGE="${STAGE:-2}"
WORK="${1:-output/cpu_mp}"
HERE="$(cd "$(dirname "$0")" && pwd)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
CPU=(--fp16 false --bf16 false --check_model false --dataloader_num_workers 0 --report_to none
     --split_dataset_ratio 0 --add_version false --save_only_model false)

case "$MODE" in
    ddp) PARALLEL=(--use_cpu true) ;;
    zero2|zero3) PARALLEL=(--deepspeed "$HERE/deepspeed/${MODE}_cpu.json") ;;
    *) echo "MODE must be ddp, zero2 or zero3, not $MODE" >&2; exit 2 ;;
esac
case "$STAGE" in
    1) TRAIN=(--tuner_type full --freeze_vit true --freeze_llm true --freeze_aligner false --learning_rate 1e-3) ;;
    2) TRAIN=(--tuner_type full --freeze_vit false --freeze_llm false --freeze_aligner false --learning_rate 1e-3) ;;
    3) TRAIN=(--tuner_type full --freeze_parameters_ratio 1 --trainable_parameters model.pruner
              --model_kwargs '{"prune_alpha": 30, "prune_beta": 30}' --learning_rate 1e-2) ;;
    *) echo "STAGE must be 1, 2 or 3, not $STAGE" >&2; exit 2 ;;
esac

[ -f "$WORK/sophia-tiny/config.json" ] || sophia build-tiny "$WORK/sophia-tiny"
[ -f "$WORK/data/train.jsonl" ] || sophia make-data "$WORK/data" --num-train 16 --num-val 4

NPROC_PER_NODE="${NPROC:-2}" \
swift sft --model "$WORK/sophia-tiny" --model_type sophia --external_plugins "$(sophia plugin-path)" \
    --dataset "$WORK/data/train.jsonl" --output_dir "$WORK/${MODE}_stage$STAGE" "${CPU[@]}" \
    "${PARALLEL[@]}" "${TRAIN[@]}" --gradient_checkpointing true --ddp_timeout 120 \
    --per_device_train_batch_size 1 --gradient_accumulation_steps 1 --max_steps 8 --logging_steps 1 \
    --save_strategy steps --save_steps 8

swift infer --model "$WORK/${MODE}_stage$STAGE/last-checkpoint" --val_dataset "$WORK/data/val.jsonl" \
    --infer_backend transformers --max_new_tokens 4 --result_path "$WORK/${MODE}_stage$STAGE/answers.jsonl"
