#!/usr/bin/env bash
# The evaluation in miniature (docs/miniature_study.md): a synthetic long-video task whose answer lives in one shot
# of many (the background colour of the one shot that shows a named shape). Stages 1-3 are trained with `swift sft`,
# then `swift infer` answers the held-out questions under each condition (study_report.CONDITIONS):
#   all frames; alpha = beta = 30; uniform subsampling to the K frames 30/30 keeps; a frame budget B
#   (PRUNE_MAX_FRAMES) and uniform subsampling to B; hierarchy off (SOPHIA_HIERARCHY=0); E = 0 (HIER_NEIGHBOURS=0);
#   and two baselines: the question without the video, and a black video.
# Then which frames each condition shows the model (stage 2's pruner and stage 3's), the NIAH heatmap of the trained
# checkpoint (`sophia niah`, where av, evalscope and matplotlib are installed) and the table (WORK/table.md, with
# 95 % Wilson intervals; rewritten after every evaluation, so a run cut short leaves what it finished).
#   bash examples/miniature_study.sh [WORK_DIR]     (default: output/miniature)
# Defaults: sophia-tiny on a CPU, 16-frame videos (about 35 minutes on 2 cores). examples/gpu_study.sh sets the GPU
# sizes. Everything below is an environment variable:
#   model      SHAPE (tiny: `sophia build-tiny`; else a shape of `sophia build-random`), PRECISION (fp32 | bf16)
#   data       NUM_TRAIN NUM_VAL FRAMES SHOTS MIN_SHOTS (training videos get MIN_SHOTS to SHOTS shots; default
#              SHOTS) SIZE NOISE STRIPE_RATE BALANCE (1: balanced answers) CONTAINER (mp4,
#              or avi: uncompressed, written without PyAV) DATA_WORKERS, or DATA: a
#              dataset written before by `sophia synthetic-shots` with the same FRAMES/SHOTS (used in place)
#   training   BATCH WORKERS STAGE1_EPOCHS STAGE2_EPOCHS STAGE3_EPOCHS STAGE1_LR STAGE2_LR STAGE3_LR, STAGE3_ACCUM
#              (stage 3's gradient accumulation: its gradient is noisy, larger batches help), and
#              STAGE2_SECONDS: stop stage 2 after that long and go on from its last checkpoint (every epoch, or
#              every STAGE2_SAVE_STEPS steps),
#              SAVE_ONLY_MODEL (true: checkpoints without the optimizer state)
#   evaluation BUDGET (default K / 2), EVAL_JOBS (evaluations at once), INFER_BATCH, NIAH (auto | 0 | 1),
#              NIAH_FRAMES NIAH_SAMPLES (questions a cell; 6: every answer colour once in every cell)
# FROM_STAGE=2 (or 3, or 4: evaluation only) keeps WORK_DIR's model, data and earlier stages; UNTIL_STAGE=1 (or 2, 3)
# stops after that stage; RESUME=1 with FROM_STAGE=2 goes on with stage 2 from its last checkpoint (its optimizer
# and schedule too: that needs SAVE_ONLY_MODEL=false) instead of starting it again.
# Shots: the true boundaries of the generated videos are written into a shot cache of the study's own
# (SOPHIA_SHOT_CACHE=WORK/shot_cache), not TransNetV2's (docs/miniature_study.md says why).
set -euo pipefail
WORK="$(realpath -m "${1:-output/miniature}")"
SHAPE="${SHAPE:-tiny}" PRECISION="${PRECISION:-fp32}"
NUM_TRAIN="${NUM_TRAIN:-512}" NUM_VAL="${NUM_VAL:-48}" FRAMES="${FRAMES:-16}" SHOTS="${SHOTS:-8}"
MIN_SHOTS="${MIN_SHOTS:-$SHOTS}" SIZE="${SIZE:-56}" NOISE="${NOISE:-4}" STRIPE_RATE="${STRIPE_RATE:-0.5}" BALANCE="${BALANCE:-0}" DATA="${DATA:-}"
CONTAINER="${CONTAINER:-mp4}" DATA_WORKERS="${DATA_WORKERS:-1}" SAVE_ONLY_MODEL="${SAVE_ONLY_MODEL:-false}"
BATCH="${BATCH:-8}" WORKERS="${WORKERS:-0}"
STAGE1_EPOCHS="${STAGE1_EPOCHS:-1}" STAGE2_EPOCHS="${STAGE2_EPOCHS:-2}" STAGE3_EPOCHS="${STAGE3_EPOCHS:-0.5}"
STAGE1_LR="${STAGE1_LR:-3e-4}" STAGE2_LR="${STAGE2_LR:-2e-3}" STAGE3_LR="${STAGE3_LR:-1e-2}" STAGE3_ACCUM="${STAGE3_ACCUM:-1}"
STAGE2_SECONDS="${STAGE2_SECONDS:-0}" STAGE2_SAVE_STEPS="${STAGE2_SAVE_STEPS:-0}"
EVAL_JOBS="${EVAL_JOBS:-1}" INFER_BATCH="${INFER_BATCH:-8}" NIAH="${NIAH:-auto}"
NIAH_FRAMES="${NIAH_FRAMES:-8,16,32,64}" NIAH_SAMPLES="${NIAH_SAMPLES:-6}"
PLUGIN="$(sophia plugin-path)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false SOPHIA_SHOT_CACHE="$WORK/shot_cache"
export VIDEO_SEGMENTS=$FRAMES
case "$PRECISION" in
    fp32) PREC=(--fp16 false --bf16 false) DTYPE=float32 ;;
    bf16) PREC=(--fp16 false --bf16 true) DTYPE=bfloat16 ;;
    *) echo "PRECISION must be fp32 or bf16" >&2; exit 2 ;;
esac
TRAIN=("${PREC[@]}" --check_model false --dataloader_num_workers "$WORKERS" --report_to none --split_dataset_ratio 0
       --gradient_checkpointing false --add_version false --save_only_model "$SAVE_ONLY_MODEL"
       --per_device_train_batch_size "$BATCH" --gradient_accumulation_steps 1 --save_strategy epoch --save_total_limit 1)
start=$SECONDS
step() { printf '\n==> [%4ds %s] %s\n' "$((SECONDS - start))" "$(date +%T)" "$*" | tee -a "$WORK/timings.txt"; }
FROM_STAGE="${FROM_STAGE:-1}" UNTIL_STAGE="${UNTIL_STAGE:-4}" RESUME="${RESUME:-0}"
[ "$FROM_STAGE" -le 1 ] && rm -rf "$WORK"
mkdir -p "$WORK"
report() { python -m swift_sophia.tools.study_report table "$WORK" > /dev/null || echo "(table not written)"; }
checkpoint() {  # a stage's final checkpoint, or the last one it saved when it was stopped early
    [ -e "$1/last-checkpoint" ] && { echo "$1/last-checkpoint"; return; }
    ls -d "$1"/checkpoint-* 2> /dev/null | sed 's/.*-\([0-9]*\)$/\1 &/' | sort -n | tail -1 | cut -d' ' -f2-
}

if [ "$FROM_STAGE" -le 1 ]; then
step "model: $SHAPE (random weights, offline tokenizer)"
if [ "$SHAPE" = tiny ]; then
    sophia build-tiny "$WORK/model" --num-frames "$FRAMES"
else
    sophia build-random --shape "$SHAPE" --dtype "$DTYPE" --num-frames "$FRAMES" "$WORK/model"
fi

if [ -n "$DATA" ]; then
    step "data: $DATA (written before), its shots into the study's shot cache"
    ln -sfn "$(cd "$DATA" && pwd)" "$WORK/data"
    sophia synthetic-shots "$WORK/data" --relocate --cache-true-shots "$SOPHIA_SHOT_CACHE"
else
    step "data: $NUM_TRAIN train ($MIN_SHOTS to $SHOTS shots), $NUM_VAL held-out videos ($SHOTS shots), $((FRAMES / SHOTS)) frames a shot of $SIZE px"
    sophia synthetic-shots "$WORK/data" --num-train "$NUM_TRAIN" --num-val "$NUM_VAL" --num-shots "$SHOTS" \
        --frames-per-shot $((FRAMES / SHOTS)) --size "$SIZE" --noise "$NOISE" --stripe-rate "$STRIPE_RATE" \
        --container "$CONTAINER" --workers "$DATA_WORKERS" $([ "$BALANCE" = 1 ] && echo --balance) \
        $([ "$MIN_SHOTS" != "$SHOTS" ] && echo --min-shots "$MIN_SHOTS") --cache-true-shots "$SOPHIA_SHOT_CACHE"
fi
NUM_TRAIN=$(wc -l < "$WORK/data/train.jsonl")

step "stage 1: projector + aggregation CNN, lr $STAGE1_LR"
swift sft --model "$WORK/model" --model_type sophia --external_plugins "$PLUGIN" \
    --dataset "$WORK/data/train.jsonl" --output_dir "$WORK/stage1" "${TRAIN[@]}" \
    --tuner_type full --freeze_vit true --freeze_llm true --freeze_aligner false \
    --learning_rate "$STAGE1_LR" --lr_scheduler_type constant --num_train_epochs "$STAGE1_EPOCHS" --logging_steps 8
fi
NUM_TRAIN=$(wc -l < "$WORK/data/train.jsonl")

[ "$UNTIL_STAGE" -le 1 ] && { step "stopped after stage 1 (UNTIL_STAGE=1)"; exit 0; }

if [ "$FROM_STAGE" -le 2 ]; then
resume=()
if [ "$RESUME" = 1 ] && [ -n "$(checkpoint "$WORK/stage2")" ]; then
    resume=(--resume_from_checkpoint "$(checkpoint "$WORK/stage2")")
    step "stage 2: going on from ${resume[1]}"
else
    rm -rf "$WORK/stage2"
    step "stage 2: joint fine-tuning (all modules), pruning off, lr $STAGE2_LR"
fi
limit=() saving=()
[ "$STAGE2_SECONDS" != 0 ] && limit=(timeout -s INT "$STAGE2_SECONDS")
[ "$STAGE2_SAVE_STEPS" != 0 ] && saving=(--save_strategy steps --save_steps "$STAGE2_SAVE_STEPS")
"${limit[@]}" swift sft --model "$WORK/stage1/last-checkpoint" --external_plugins "$PLUGIN" \
    --dataset "$WORK/data/train.jsonl" --output_dir "$WORK/stage2" "${TRAIN[@]}" \
    --tuner_type full --freeze_vit false --freeze_llm false --freeze_aligner false \
    --learning_rate "$STAGE2_LR" --warmup_ratio 0.05 --num_train_epochs "$STAGE2_EPOCHS" --logging_steps 4 "${saving[@]}" \
    "${resume[@]}" \
    || { code=$?; [ "$code" = 124 ] && [ -n "$(checkpoint "$WORK/stage2")" ] || exit $code
         echo "stage 2 stopped after $STAGE2_SECONDS s: going on from $(checkpoint "$WORK/stage2")"; }
fi

[ "$UNTIL_STAGE" -le 2 ] && { step "stopped after stage 2 (UNTIL_STAGE=2)"; exit 0; }

if [ "$FROM_STAGE" -le 3 ]; then
rm -rf "$WORK/stage3"
# the Gumbel temperature reaches its floor (0.1) at about 70 % of stage 3's pruned videos
ANNEAL=$(python -c "import math; print(f'{math.log(10) / (0.7 * $NUM_TRAIN * $STAGE3_EPOCHS):.2e}')")
step "stage 3: the pruner's query MLP alone, pruning on (alpha = beta = 30), lr $STAGE3_LR, anneal rate $ANNEAL"
swift sft --model "$(checkpoint "$WORK/stage2")" --external_plugins "$PLUGIN" \
    --dataset "$WORK/data/train.jsonl" --output_dir "$WORK/stage3" "${TRAIN[@]}" \
    --tuner_type full --freeze_parameters_ratio 1 --trainable_parameters model.pruner \
    --model_kwargs "{\"prune_alpha\": 30, \"prune_beta\": 30, \"gumbel_anneal_rate\": $ANNEAL}" \
    --learning_rate "$STAGE3_LR" --lr_scheduler_type cosine --warmup_ratio 0.03 \
    --num_train_epochs "$STAGE3_EPOCHS" --gradient_accumulation_steps "$STAGE3_ACCUM" --logging_steps 4
fi
[ "$UNTIL_STAGE" -le 3 ] && { step "stopped after stage 3 (UNTIL_STAGE=3)"; exit 0; }

rm -rf "$WORK/eval" "$WORK/niah" "$WORK/niah_inputs" "$WORK/kept.json"
mkdir -p "$WORK/eval"
CKPT="$WORK/stage3/last-checkpoint"
K=$(python -c "
from swift_sophia.model.pruning import drop_count
s, n = $SHOTS, $FRAMES // $SHOTS
print((s - drop_count(30, s)) * (n - drop_count(30, n)))")
BUDGET="${BUDGET:-$(( K / 2 > 0 ? K / 2 : 1 ))}"
# enough new tokens for any answer (8 cut `ANSWER: E` off before its letter with the study's tokenizer)
MAX_NEW_TOKENS="$(python -m swift_sophia.tools.study_report answer-tokens "$WORK")"
echo "F=$FRAMES K=$K B=$BUDGET" > "$WORK/sizes.txt"
evaluate() {  # name, rows, then environment settings
    local name=$1 rows=$2; shift 2
    env "$@" swift infer --model "$CKPT" --val_dataset "$rows" --infer_backend transformers --max_new_tokens "$MAX_NEW_TOKENS" \
        --max_batch_size "$INFER_BATCH" --result_path "$WORK/eval/$name.jsonl" > "$WORK/eval/$name.log" 2>&1 \
        || { echo "evaluation $name failed:"; tail -30 "$WORK/eval/$name.log"; return 1; }
    echo "evaluated $name at $((SECONDS - start)) s"
}
VAL="$WORK/data/val.jsonl" ALL=(VIDEO_SEGMENTS=$FRAMES PRUNE_ALPHA=0 PRUNE_BETA=0 PRUNE_MAX_FRAMES=0)
P30=(VIDEO_SEGMENTS=$FRAMES PRUNE_ALPHA=30 PRUNE_BETA=30 PRUNE_MAX_FRAMES=0)
EVALS=("all_frames $VAL ${ALL[*]}"
       "prune30 $VAL ${P30[*]}"
       "uniform_K $VAL VIDEO_SEGMENTS=$K PRUNE_ALPHA=0 PRUNE_BETA=0 PRUNE_MAX_FRAMES=0"
       "budget $VAL VIDEO_SEGMENTS=$FRAMES PRUNE_ALPHA=0 PRUNE_BETA=0 PRUNE_MAX_FRAMES=$BUDGET"
       "uniform_B $VAL VIDEO_SEGMENTS=$BUDGET PRUNE_ALPHA=0 PRUNE_BETA=0 PRUNE_MAX_FRAMES=0"
       "no_hierarchy $VAL ${P30[*]} SOPHIA_HIERARCHY=0"
       "neighbours_0 $VAL ${P30[*]} HIER_NEIGHBOURS=0"
       "text_only $WORK/data/val_text_only.jsonl ${ALL[*]}"
       "blank_video $WORK/data/val_blank.jsonl ${ALL[*]}")
step "evaluating ${#EVALS[@]} conditions, $EVAL_JOBS at a time (F = $FRAMES, K = $K, B = $BUDGET)"
failed=0
for spec in "${EVALS[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$EVAL_JOBS" ]; do wait -n || failed=1; report; done
    # shellcheck disable=SC2086  # the spec's words are the name, the rows and the settings
    evaluate $spec &
done
while [ -n "$(jobs -rp)" ]; do wait -n || failed=1; report; done
wait || failed=1
report
[ "$failed" = 0 ] || { echo "some evaluations failed (logs in $WORK/eval)"; exit 1; }

step "which frames each condition shows the model (stage 2's and stage 3's pruner)"
python -m swift_sophia.tools.study_report frames "$WORK" --frames "$FRAMES" --k "$K" --budget "$BUDGET"
report

if [ "$NIAH" = auto ]; then
    python -c "import av, evalscope, matplotlib" 2> /dev/null && NIAH=1 || NIAH=0
    [ "$NIAH" = 0 ] && echo "NIAH skipped: it needs av, evalscope and matplotlib (run sophia niah on $CKPT elsewhere)"
fi
if [ "$NIAH" = 1 ]; then
    step "NIAH heatmap of the trained checkpoint (sophia niah: the task's answer shot in a haystack of its other shots, pruning off)"
    # a haystack as long as the largest cell, of the training videos' distractor shots, and one needle per colour and
    # shape with the training rows' question: the heatmap asks the task itself at each length and depth
    LONGEST=$(tr ',' '\n' <<< "$NIAH_FRAMES" | sort -n | tail -1) PER_SHOT=$((FRAMES / SHOTS))
    sophia synthetic-shots "$WORK/niah_inputs" --niah-inputs --num-shots $(((LONGEST + PER_SHOT - 1) / PER_SHOT)) \
        --frames-per-shot "$PER_SHOT" --size "$SIZE" --noise "$NOISE" --stripe-rate "$STRIPE_RATE" > "$WORK/niah.log"
    PRUNE_ALPHA=0 PRUNE_BETA=0 sophia niah --model "$CKPT" --output-dir "$WORK/niah" --frames "$NIAH_FRAMES" \
        --depths 0,25,50,75,100 --samples "$NIAH_SAMPLES" --haystack "$WORK/niah_inputs/haystack.mp4" \
        --needles "$WORK/niah_inputs/needles.jsonl" \
        --swift-args "--infer_backend transformers --max_new_tokens $MAX_NEW_TOKENS --eval_num_proc 4 --host 127.0.0.1 --port $((19000 + RANDOM % 1000)) --eval_generation_config '{\"retries\": 1}'" \
        >> "$WORK/niah.log" 2>&1 || { tail -30 "$WORK/niah.log"; exit 1; }
fi

step "done"
python -m swift_sophia.tools.study_report table "$WORK"
