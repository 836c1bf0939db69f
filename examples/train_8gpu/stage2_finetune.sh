#!/usr/bin/env bash
# Stage 2 (joint fine-tuning) on 8 GPUs: aggregation CNN + projector + LLM, vision tower frozen; lr 1e-5,
# cosine, warmup 0.03; ZeRO-3 because the LLM's optimizer states now dominate. The data mix of the paper.
#   MODEL=output/sophia-stage1/vX-.../checkpoint-N DATA_DIR=... bash examples/train_8gpu/stage2_finetune.sh
# LoRA instead of full fine-tuning: add  --tuner_type lora --target_modules all-linear  (and use zero2).
# A rank that waits more than DDP_TIMEOUT seconds (default 1800) in a collective fails the job instead of hanging
# (ms-swift's default is 18,000,000 s). Several nodes: run it on each node with NNODES, NODE_RANK, MASTER_ADDR
# and MASTER_PORT set. The same job on CPU processes: examples/cpu_multiprocess.sh.
# Checkpoints keep the optimizer, scheduler and RNG state (--save_only_model false; ZeRO adds about 12 bytes per
# trained parameter: an estimated 120 GB a checkpoint here, as the 8B model's LLM trains). To resume a stopped
# run, add --resume_from_checkpoint "$OUT/checkpoint-N" to the command below.
set -euo pipefail
MODEL="${MODEL:?the stage 1 checkpoint}"
DATA_DIR="${DATA_DIR:?folder with the ms-swift jsonl files of the data mix}"
OUT="${OUT:-output/sophia-stage2}"
NPROC_PER_NODE=8 VIDEO_SEGMENTS="${VIDEO_SEGMENTS:-128}" \
swift sft \
    --model "$MODEL" --external_plugins "$(sophia plugin-path)" \
    --dataset "$DATA_DIR/activitynet_qa.jsonl" "$DATA_DIR/perception_test.jsonl" "$DATA_DIR/nextqa.jsonl" \
              "$DATA_DIR/youcook2.jsonl" "$DATA_DIR/moviechat_1k_train.jsonl" "$DATA_DIR/llava_video_178k.jsonl" \
    --tuner_type full --freeze_vit true --freeze_llm false --freeze_aligner false \
    --torch_dtype bfloat16 --attn_impl sdpa \
    --learning_rate 1e-5 --lr_scheduler_type cosine --warmup_ratio 0.03 \
    --num_train_epochs 1 --per_device_train_batch_size 1 --gradient_accumulation_steps 16 \
    --max_length 65536 --gradient_checkpointing true \
    --deepspeed zero3 --dataloader_num_workers 8 --dataset_num_proc 16 \
    --model_kwargs '{"prune_alpha": 0, "prune_beta": 0}' \
    --ddp_timeout "${DDP_TIMEOUT:-1800}" \
    --save_steps 500 --save_total_limit 2 --save_only_model false --logging_steps 10 --output_dir "$OUT"
