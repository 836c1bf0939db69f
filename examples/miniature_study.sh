#!/usr/bin/env bash
# The evaluation in miniature, on the tiny default and a CPU (docs/miniature_study.md): a synthetic long-video task
# whose answer lives in one shot of 8 (16 frames; FRAMES, SHOTS): the background colour of the one shot that shows
# a named shape. Stages 1-3 are trained with `swift sft`, then `swift eval` runs on the held-out set with
#   (1) pruning off, all frames; (2) uniform subsampling to the frame count that pruning keeps (VIDEO_SEGMENTS=K);
#   (3) Sophia's pruning, PRUNE_ALPHA=30 PRUNE_BETA=30; (4) pruning on, hierarchy off (SOPHIA_HIERARCHY=0);
# then which frames each condition shows the model (and stage 2's pruner, before stage 3), the NIAH heatmap of the
# trained checkpoint (`sophia niah`), and the table.
#   bash examples/miniature_study.sh [WORK_DIR]     (default: output/miniature)
# About 33 minutes on 2 shared CPU cores. Sizes: NUM_TRAIN, NUM_VAL, STAGE2_EPOCHS, STAGE3_EPOCHS, STAGE3_LR
# (environment). FROM_STAGE=2 (or 3) keeps WORK_DIR's model, data and earlier stages and starts at that stage
# (give the sizes of the run that made them).
# Shots: the true boundaries of the generated videos are written into a shot cache of the study's own
# (SOPHIA_SHOT_CACHE=WORK/shot_cache), not TransNetV2's (docs/miniature_study.md says why).
set -euo pipefail
WORK="${1:-output/miniature}"
NUM_TRAIN="${NUM_TRAIN:-512}" NUM_VAL="${NUM_VAL:-48}"
STAGE1_EPOCHS="${STAGE1_EPOCHS:-1}" STAGE2_EPOCHS="${STAGE2_EPOCHS:-2}" STAGE3_EPOCHS="${STAGE3_EPOCHS:-0.5}"
STAGE3_LR="${STAGE3_LR:-1e-2}"
FRAMES="${FRAMES:-16}" SHOTS="${SHOTS:-8}"
PLUGIN="$(sophia plugin-path)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false SOPHIA_SHOT_CACHE="$PWD/$WORK/shot_cache"
export VIDEO_SEGMENTS=$FRAMES
CPU=(--fp16 false --bf16 false --check_model false --dataloader_num_workers 0 --report_to none
     --split_dataset_ratio 0 --gradient_checkpointing false --add_version false --save_only_model false)
start=$SECONDS
step() { printf '\n==> [%4ds] %s\n' "$((SECONDS - start))" "$*" | tee -a "$WORK/timings.txt"; }
FROM_STAGE="${FROM_STAGE:-1}"
[ "$FROM_STAGE" -le 1 ] && rm -rf "$WORK"
mkdir -p "$WORK"

if [ "$FROM_STAGE" -le 1 ]; then
step "1/9 building sophia-tiny (random weights, offline tokenizer)"
sophia build-tiny "$WORK/sophia-tiny"

step "2/9 writing the one-shot-among-many dataset ($NUM_TRAIN train, $NUM_VAL held-out videos, $SHOTS shots x 2 frames)"
sophia synthetic-shots "$WORK/data" --num-train "$NUM_TRAIN" --num-val "$NUM_VAL" \
    --num-shots $SHOTS --frames-per-shot $((FRAMES / SHOTS)) --cache-true-shots "$SOPHIA_SHOT_CACHE"

step "3/9 stage 1: projector + aggregation CNN"
swift sft --model "$WORK/sophia-tiny" --model_type sophia --external_plugins "$PLUGIN" \
    --dataset "$WORK/data/train.jsonl" --output_dir "$WORK/stage1" "${CPU[@]}" \
    --tuner_type full --freeze_vit true --freeze_llm true --freeze_aligner false \
    --learning_rate 3e-4 --lr_scheduler_type constant --num_train_epochs "$STAGE1_EPOCHS" \
    --per_device_train_batch_size 8 --logging_steps 8 --save_strategy epoch --save_total_limit 1
fi

if [ "$FROM_STAGE" -le 2 ]; then
rm -rf "$WORK/stage2"
step "4/9 stage 2: joint fine-tuning (all modules), pruning off"
swift sft --model "$WORK/stage1/last-checkpoint" --external_plugins "$PLUGIN" \
    --dataset "$WORK/data/train.jsonl" --output_dir "$WORK/stage2" "${CPU[@]}" \
    --tuner_type full --freeze_vit false --freeze_llm false --freeze_aligner false \
    --learning_rate 2e-3 --warmup_ratio 0.05 --num_train_epochs "$STAGE2_EPOCHS" \
    --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --logging_steps 4 --save_strategy epoch --save_total_limit 1
fi

rm -rf "$WORK/stage3" "$WORK/eval" "$WORK/niah"
# the Gumbel temperature reaches its floor (0.1) at about 70 % of stage 3's pruned videos
ANNEAL=$(python -c "import math; print(f'{math.log(10) / (0.7 * $NUM_TRAIN * $STAGE3_EPOCHS):.2e}')")
step "5/9 stage 3: the pruner's query MLP alone, pruning on (alpha = beta = 30), lr $STAGE3_LR, anneal rate $ANNEAL"
swift sft --model "$WORK/stage2/last-checkpoint" --external_plugins "$PLUGIN" \
    --dataset "$WORK/data/train.jsonl" --output_dir "$WORK/stage3" "${CPU[@]}" \
    --tuner_type full --freeze_parameters_ratio 1 --trainable_parameters model.pruner \
    --model_kwargs "{\"prune_alpha\": 30, \"prune_beta\": 30, \"gumbel_anneal_rate\": $ANNEAL}" \
    --learning_rate "$STAGE3_LR" --lr_scheduler_type cosine --warmup_ratio 0.03 \
    --num_train_epochs "$STAGE3_EPOCHS" --per_device_train_batch_size 8 --gradient_accumulation_steps 1 --logging_steps 4 \
    --save_strategy epoch --save_total_limit 1

CKPT="$WORK/stage3/last-checkpoint"
K=$(python -c "
from swift_sophia.model.pruning import drop_count
s, n = $SHOTS, $FRAMES // $SHOTS
print((s - drop_count(30, s)) * (n - drop_count(30, n)))")
EVAL=(--eval_backend Native --eval_dataset general_vmcq --eval_dataset_args "$WORK/data/eval_set/eval_dataset_args.json"
      --infer_backend transformers --max_new_tokens 16 --eval_num_proc 4 --host 127.0.0.1
      --eval_generation_config '{"retries": 1}')
evaluate() {  # name, checkpoint, then environment settings
    local name=$1 model=$2; shift 2
    step "evaluating: $name ($*)"
    env "$@" swift eval --model "$model" "${EVAL[@]}" --port $((18000 + RANDOM % 1000)) \
        --eval_output_dir "$WORK/eval/$name" > "$WORK/eval/$name.log" 2>&1 \
        || { tail -30 "$WORK/eval/$name.log"; exit 1; }
}
mkdir -p "$WORK/eval"
evaluate all_frames "$CKPT" VIDEO_SEGMENTS=$FRAMES PRUNE_ALPHA=0 PRUNE_BETA=0
evaluate uniform_K "$CKPT" VIDEO_SEGMENTS=$K PRUNE_ALPHA=0 PRUNE_BETA=0
evaluate prune30 "$CKPT" VIDEO_SEGMENTS=$FRAMES PRUNE_ALPHA=30 PRUNE_BETA=30

step "8/9 which frames each condition shows the model (is the answer shot among them?)"
python - "$WORK" $FRAMES $K <<'PY' | tee "$WORK/kept.txt"
import json, sys
from swift_sophia.tools.synthetic_shots import answer_seen, pruned_frames, uniform_frames
work, frames, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
manifest = json.load(open(f"{work}/data/manifest.json"))
rows = [json.loads(line) for line in open(f"{work}/data/val.jsonl")]
spans = [manifest["videos"][r["videos"][0]]["answer_frames"] for r in rows]
shown = {"all_frames": [list(range(frames))] * len(rows), "uniform_K": [uniform_frames(frames, k)] * len(rows),
         "prune30": pruned_frames(f"{work}/stage3/last-checkpoint", rows, frames=frames),
         "prune30_stage2_pruner": pruned_frames(f"{work}/stage2/last-checkpoint", rows, frames=frames)}
shown["prune30_no_hierarchy"] = shown["prune30"]  # the pruner's selection does not depend on the hierarchy
out = {name: {"frames": sorted({len(f) for f in fs}), "answer_shown": [answer_seen(f, s) for f, s in zip(fs, spans)]}
       for name, fs in shown.items()}
json.dump({**out, "kept_frames": {n: fs for n, fs in shown.items()}}, open(f"{work}/kept.json", "w"))
for name, o in out.items():
    print(f"{name}: frames {o['frames']}, answer shot shown in {sum(o['answer_shown'])}/{len(rows)}")
PY

step "9/9 NIAH heatmap of the trained checkpoint (sophia niah, pruning off)"
sophia niah --model "$CKPT" --output-dir "$WORK/niah" --frames 8,16,32,64 --depths 0,25,50,75,100 --samples 2 \
    --swift-args "--infer_backend transformers --max_new_tokens 16 --eval_num_proc 4 --host 127.0.0.1 --port $((19000 + RANDOM % 1000)) --eval_generation_config '{\"retries\": 1}'" \
    > "$WORK/niah.log" 2>&1 || { tail -30 "$WORK/niah.log"; exit 1; }

evaluate prune30_no_hierarchy "$CKPT" VIDEO_SEGMENTS=$FRAMES PRUNE_ALPHA=30 PRUNE_BETA=30 SOPHIA_HIERARCHY=0

step "done"
python - "$WORK" <<'PY' | tee "$WORK/table.md"
import glob, json, os, re, sys
work = sys.argv[1]
kept = json.load(open(f"{work}/kept.json"))
names = {"all_frames": "(1) pruning off, all frames", "uniform_K": "(2) uniform subsampling to K frames",
         "prune30": "(3) Sophia's pruning, alpha = beta = 30", "prune30_no_hierarchy": "(4) as (3), hierarchy off"}
print("| condition | frames to the LLM | answer shot among them | accuracy | accuracy, shot shown | accuracy, shot not shown |")
print("|---|---|---|---|---|---|")
for name, label in names.items():
    reviews = glob.glob(f"{work}/eval/{name}/native/*/reviews/*/general_vmcq_default.jsonl")
    if not reviews or name not in kept:
        print(f"| {label} | not run | | | | |")
        continue
    scores = {}
    for line in open(sorted(reviews)[-1]):
        r = json.loads(line)
        scores[int(r["index"])] = float(r["sample_score"]["score"]["value"]["acc"])
    shown = kept[name]["answer_shown"]
    def acc(idx):
        idx = [i for i in idx if i in scores]
        return f"{sum(scores[i] for i in idx) / len(idx):.3f} ({int(sum(scores[i] for i in idx))}/{len(idx)})" if idx else "-"
    n = len(shown)
    frames = "/".join(map(str, kept[name]["frames"]))
    print(f"| {label} | {frames} | {sum(shown)}/{n} | {acc(range(n))} | {acc([i for i in range(n) if shown[i]])} "
          f"| {acc([i for i in range(n) if not shown[i]])} |")
n = len(kept["prune30_stage2_pruner"]["answer_shown"])
print(f"\nanswer shot kept by the stage 2 pruner (identity query MLP): {sum(kept['prune30_stage2_pruner']['answer_shown'])}/{n}, "
      f"by the stage 3 pruner: {sum(kept['prune30']['answer_shown'])}/{n}\n")
for stage in ("stage1", "stage2", "stage3"):
    logs = [json.loads(l) for l in open(f"{work}/{stage}/logging.jsonl") if '"loss"' in l]
    last = [l for l in logs if "loss" in l and "train_loss" not in l]
    if last:
        print(f"{stage}: first logged loss {float(last[0]['loss']):.3f}, last {float(last[-1]['loss']):.3f}"
              + (f", token_acc {float(last[-1]['token_acc']):.3f}" if "token_acc" in last[-1] else "")
              + f" ({len(logs)} log lines)")
if not os.path.exists(f"{work}/niah/niah_results.json"):
    sys.exit(0)
niah = json.load(open(f"{work}/niah/niah_results.json"))
print("\nNIAH (accuracy by frames x depth):")
for c in niah["cells"]:
    print(f"  frames {c['frames']:>3} depth {c['depth']:>3}%: {c['accuracy']} ({c['answered']} answered)")
PY
