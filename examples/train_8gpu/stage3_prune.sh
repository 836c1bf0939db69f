#!/usr/bin/env bash
# Stage 3 (pruning) on 8 GPUs: train only the frame pruner's query MLP with Gumbel-Softmax (temperature
# annealed), everything else frozen; lr 1e-4. Shots are read from the on-disk cache: precompute them first,
#   sophia precompute-shots "$DATA_DIR"/*.jsonl --num-frames 128 --workers 32
# A rank that waits more than DDP_TIMEOUT seconds (default 1800) in a collective fails the job instead of hanging
# (ms-swift's default is 18,000,000 s). Several nodes: run it on each node with NNODES, NODE_RANK, MASTER_ADDR
# and MASTER_PORT set. The same job on CPU processes: examples/cpu_multiprocess.sh.
# Checkpoints keep the optimizer, scheduler and RNG state (--save_only_model false; ZeRO adds about 12 bytes per
# trained parameter). To resume a stopped run, add --resume_from_checkpoint "$OUT/checkpoint-N" to the
# command below.
set -euo pipefail
MODEL="${MODEL:?the stage 2 checkpoint}"
DATA_DIR="${DATA_DIR:?folder with the ms-swift jsonl files of the data mix}"
OUT="${OUT:-output/sophia-stage3}"
NPROC_PER_NODE=8 VIDEO_SEGMENTS="${VIDEO_SEGMENTS:-128}" \
swift sft \
    --model "$MODEL" --external_plugins "$(sophia plugin-path)" \
    --dataset "$DATA_DIR/activitynet_qa.jsonl" "$DATA_DIR/nextqa.jsonl" "$DATA_DIR/llava_video_178k.jsonl" \
    --tuner_type full --freeze_parameters_ratio 1 --trainable_parameters model.pruner \
    --torch_dtype bfloat16 --attn_impl sdpa \
    --learning_rate 1e-4 --lr_scheduler_type cosine --warmup_ratio 0.03 \
    --num_train_epochs 1 --per_device_train_batch_size 2 --gradient_accumulation_steps 8 \
    --max_length 65536 --gradient_checkpointing true \
    --deepspeed zero2 --dataloader_num_workers 8 \
    --model_kwargs '{"prune_alpha": 30, "prune_beta": 30}' \
    --ddp_timeout "${DDP_TIMEOUT:-1800}" \
    --save_steps 500 --save_total_limit 2 --save_only_model false --logging_steps 10 --output_dir "$OUT"
