#!/usr/bin/env bash
# Stage 1 (alignment) on one node of 8 GPUs: train the new modules (projector + aggregation CNN) from scratch,
# vision tower and LLM frozen; lr 3e-4, constant. Global batch 128 = 8 GPUs x 2 x 8 accumulation.
#   MODEL=/path/to/sophia-8b DATA_DIR=/path/to/data bash examples/train_8gpu/stage1_align.sh
# MODEL comes from released InternVL weights (original or -hf layout, a folder or a hub name; docs/checkpoints.md):
#   sophia init-from-internvl OpenGVLab/InternVL2-8B /path/to/sophia-8b --num-frames 128
# Its args.json holds the base's system prompt; to train with it, add --load_args true to the command below.
# A rank that waits more than DDP_TIMEOUT seconds (default 1800) in a collective fails the job instead of hanging
# (ms-swift's default is 18,000,000 s). Several nodes: run it on each node with NNODES, NODE_RANK, MASTER_ADDR
# and MASTER_PORT set. The same job on CPU processes: examples/cpu_multiprocess.sh.
# Checkpoints keep the optimizer, scheduler and RNG state (--save_only_model false; ZeRO adds about 12 bytes per
# trained parameter). To resume a stopped run, add --resume_from_checkpoint "$OUT/checkpoint-N" to the
# command below.
set -euo pipefail
MODEL="${MODEL:?a Sophia checkpoint, e.g. made by: sophia init-from-internvl OpenGVLab/InternVL2-8B ...}"
DATA_DIR="${DATA_DIR:?folder with the ms-swift jsonl files of the data mix}"
OUT="${OUT:-output/sophia-stage1}"
NPROC_PER_NODE=8 VIDEO_SEGMENTS="${VIDEO_SEGMENTS:-128}" \
swift sft \
    --model "$MODEL" --model_type sophia --external_plugins "$(sophia plugin-path)" \
    --dataset "$DATA_DIR/llava_video_178k.jsonl" "$DATA_DIR/activitynet_qa.jsonl" \
    --tuner_type full --freeze_vit true --freeze_llm true --freeze_aligner false \
    --torch_dtype bfloat16 --attn_impl sdpa \
    --learning_rate 3e-4 --lr_scheduler_type constant --warmup_ratio 0 \
    --num_train_epochs 1 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --max_length 65536 --gradient_checkpointing true \
    --deepspeed zero2 --dataloader_num_workers 8 --dataset_num_proc 16 \
    --model_kwargs '{"prune_alpha": 0, "prune_beta": 0}' \
    --ddp_timeout "${DDP_TIMEOUT:-1800}" \
    --save_steps 500 --save_total_limit 2 --save_only_model false --logging_steps 10 --output_dir "$OUT"
