#!/usr/bin/env bash
# The miniature study at GPU size (docs/miniature_study.md, "The study on a GPU"): examples/miniature_study.sh with
# the study-small model (about 31 M parameters from random weights: a 4-layer tower at 112 px, 16 tokens a frame,
# an 8-layer decoder of width 512), bf16, on 128-frame videos of 32 shots of 4 frames whose answer is in one shot
# (training videos: 2 to 32 shots, 8 to 128 frames: the decoder learns more than one length, and easy videos
# among hard ones; on the CPU both helped, docs/miniature_study.md),
# balanced answers, uncompressed AVI videos written on the spot (no encoder needed), a frame budget of 16 frames.
# About 17 minutes on one H200 and 16 CPU cores, stage 2's 800 steps 9 of them (docs/miniature_study.md, fourth
# run: 1.000 held-out, the answer shot kept by the pruner in 192/192). Stage 3 at lr 1e-2, gradient accumulation 4:
# its gradient is noisy (docs/miniature_study.md, "Stage 3's gradient"). NIAH where av, evalscope and matplotlib
# are installed. Every size is an environment variable (see examples/miniature_study.sh) and may be overridden.
#   bash examples/gpu_study.sh [WORK_DIR]     (default: output/gpu_study)
# Held-out videos of 8 shots (32 frames), the whole study in about 8 minutes (docs/miniature_study.md, third run):
#   SHOTS=8 FRAMES=32 STAGE2_EPOCHS=3 STAGE3_EPOCHS=1.5 BUDGET=8 bash examples/gpu_study.sh WORK_DIR
# In pieces, where jobs have a time limit (checkpoints every STAGE2_SAVE_STEPS steps):
#   UNTIL_STAGE=2 STAGE2_SECONDS=300 SAVE_ONLY_MODEL=false bash examples/gpu_study.sh WORK_DIR   # stages 1, 2 (part)
#   FROM_STAGE=2 RESUME=1 SAVE_ONLY_MODEL=false UNTIL_STAGE=2 bash examples/gpu_study.sh WORK_DIR  # more of stage 2
#   FROM_STAGE=3 bash examples/gpu_study.sh WORK_DIR                      # stage 3, evaluations, frame analysis
set -euo pipefail
export SHAPE="${SHAPE:-study-small}" PRECISION="${PRECISION:-bf16}"
export FRAMES="${FRAMES:-128}" SHOTS="${SHOTS:-32}" MIN_SHOTS="${MIN_SHOTS:-2}" SIZE="${SIZE:-112}" NOISE="${NOISE:-4}"
export STRIPE_RATE="${STRIPE_RATE:-0.5}" BALANCE="${BALANCE:-1}" CONTAINER="${CONTAINER:-avi}"
export NUM_TRAIN="${NUM_TRAIN:-2560}" NUM_VAL="${NUM_VAL:-192}" DATA_WORKERS="${DATA_WORKERS:-12}"
export BATCH="${BATCH:-16}" WORKERS="${WORKERS:-12}" SAVE_ONLY_MODEL="${SAVE_ONLY_MODEL:-true}"
export STAGE1_EPOCHS="${STAGE1_EPOCHS:-0.25}" STAGE1_LR="${STAGE1_LR:-1e-3}"
export STAGE2_EPOCHS="${STAGE2_EPOCHS:-5}" STAGE2_LR="${STAGE2_LR:-1e-3}" STAGE2_SECONDS="${STAGE2_SECONDS:-0}"
export STAGE2_SAVE_STEPS="${STAGE2_SAVE_STEPS:-32}"
export STAGE3_EPOCHS="${STAGE3_EPOCHS:-1.5}" STAGE3_LR="${STAGE3_LR:-1e-2}" STAGE3_ACCUM="${STAGE3_ACCUM:-4}"
export BUDGET="${BUDGET:-16}" EVAL_JOBS="${EVAL_JOBS:-5}" INFER_BATCH="${INFER_BATCH:-32}"
export NIAH="${NIAH:-auto}" NIAH_FRAMES="${NIAH_FRAMES:-32,64,128,256}" NIAH_SAMPLES="${NIAH_SAMPLES:-6}"
exec bash "$(dirname "$0")/miniature_study.sh" "${1:-output/gpu_study}"
