"""The miniature study's analysis (examples/miniature_study.sh): which frames each condition shows the model, and
the table of accuracy with its 95 % Wilson interval, frames kept and how often the answer shot is among them.

    python -m swift_sophia.tools.study_report frames WORK --frames 128 --k 66 --budget 16
    python -m swift_sophia.tools.study_report table WORK          # writes WORK/table.md and WORK/results.json

Each condition's answers are a `swift infer` result file, `WORK/eval/NAME.jsonl` (rows with `response` and
`labels`); a condition not run yet is listed as such, so the table can be written after every evaluation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

# name -> (label, the environment `swift infer` runs with; F frames sampled, K = what 30/30 keeps, B = the budget)
CONDITIONS: Dict[str, Tuple[str, str]] = {
    "all_frames": ("(1) pruning off, all frames", "VIDEO_SEGMENTS=F PRUNE_ALPHA=0 PRUNE_BETA=0"),
    "prune30": ("(2) Sophia's pruning, alpha = beta = 30", "PRUNE_ALPHA=30 PRUNE_BETA=30"),
    "uniform_K": ("(3) uniform subsampling to K frames", "VIDEO_SEGMENTS=K PRUNE_ALPHA=0 PRUNE_BETA=0"),
    "budget": ("(4) frame budget B, no alpha/beta", "PRUNE_ALPHA=0 PRUNE_BETA=0 PRUNE_MAX_FRAMES=B"),
    "uniform_B": ("(5) uniform subsampling to B frames", "VIDEO_SEGMENTS=B PRUNE_ALPHA=0 PRUNE_BETA=0"),
    "no_hierarchy": ("(6) as (2), hierarchy off", "... SOPHIA_HIERARCHY=0"),
    "neighbours_0": ("(7) as (2), E = 0 (trained with E = 2)", "... HIER_NEIGHBOURS=0"),
    "text_only": ("baseline: the question without the video", "val_text_only.jsonl"),
    "blank_video": ("baseline: a black video of F frames", "val_blank.jsonl, pruning off"),
}
# the conditions whose frames come from the pruner, by the setting it ran with
PRUNED = {"prune30": dict(alpha=30, beta=30), "budget": dict(alpha=0, beta=0, budget=True)}
SAME_FRAMES_AS = {"no_hierarchy": "prune30", "neighbours_0": "prune30", "blank_video": "all_frames"}
NO_ANSWER_SHOT = {"blank_video"}  # frames shown, but none of them is the answer shot
ANSWER = re.compile(r"ANSWER\s*:\s*\(?\s*([A-Z])\b")


def wilson(successes: int, n: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % for z = 1.96); (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def letter(text: Optional[str]) -> Optional[str]:
    """The option letter of a reply `ANSWER: X` (None if there is none)."""
    match = ANSWER.search(text or "")
    return match.group(1) if match else None


def _read_jsonl(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def scores(result_path: str) -> List[int]:
    """1 or 0 per row of a `swift infer` result file, in its order: the reply's letter against the label's."""
    return [int(letter(r.get("response")) is not None and letter(r.get("response")) == letter(r["labels"]))
            for r in _read_jsonl(result_path)]


def frames_shown(work: str, frames: int, k: int, budget: int) -> Dict[str, List[List[int]]]:
    """The frames (native numbers) each video-showing condition gives the model, per held-out row, and what stage
    2's pruner (before stage 3) would have kept under the same settings."""
    from .synthetic_shots import pruned_frames, uniform_frames

    rows = _read_jsonl(os.path.join(work, "data", "val.jsonl"))
    shown = {"all_frames": [list(range(frames))] * len(rows), "uniform_K": [uniform_frames(frames, k)] * len(rows),
             "uniform_B": [uniform_frames(frames, budget)] * len(rows)}
    for stage, suffix in (("stage3", ""), ("stage2", "_stage2_pruner")):
        checkpoint = _checkpoint(os.path.join(work, stage))
        if checkpoint is None:
            continue
        for name, setting in PRUNED.items():
            shown[name + suffix] = pruned_frames(checkpoint, rows, alpha=setting["alpha"], beta=setting["beta"],
                                                 frames=frames, max_frames=budget if setting.get("budget") else 0)
    for name, same in SAME_FRAMES_AS.items():  # the pruner's selection does not depend on the decoder's attention
        if same in shown:
            shown[name] = shown[same]
    return shown


def _checkpoint(stage_dir: str) -> Optional[str]:
    """A stage's final checkpoint, or the last one it saved when it was stopped early."""
    if os.path.isdir(os.path.join(stage_dir, "last-checkpoint")):
        return os.path.join(stage_dir, "last-checkpoint")
    saved = [n for n in os.listdir(stage_dir) if re.fullmatch(r"checkpoint-\d+", n)] if os.path.isdir(stage_dir) else []
    return os.path.join(stage_dir, max(saved, key=lambda n: int(n.split("-")[1]))) if saved else None


def answer_spans(work: str) -> List[List[int]]:
    manifest = json.load(open(os.path.join(work, "data", "manifest.json")))
    rows = _read_jsonl(os.path.join(work, "data", "val.jsonl"))
    return [manifest["videos"][r["videos"][0]]["answer_frames"] for r in rows]


def answer_tokens(work: str) -> int:
    """New tokens an evaluation needs to write any held-out answer and stop: the longest reference answer in the
    model's own tokens, plus one for the end of the turn (the study's tokenizer spells `ANSWER: E` in 9 tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(work, "model"))
    rows = _read_jsonl(os.path.join(work, "data", "val.jsonl"))
    return max(len(tokenizer.encode(r["messages"][-1]["content"], add_special_tokens=False)) for r in rows) + 1


def _interval(hits: int, n: int) -> Dict:
    lo, hi = wilson(hits, n)
    return {"hits": hits, "n": n, "accuracy": hits / n if n else None, "ci95": [lo, hi]}


def results(work: str) -> Dict:
    """Every condition's accuracy and interval, frames kept and answer-shot coverage (what the table shows)."""
    kept_path = os.path.join(work, "kept.json")
    kept = json.load(open(kept_path)) if os.path.exists(kept_path) else {}
    spans = answer_spans(work)
    out = {"conditions": {}, "pruner": {}}
    for name, (label, env) in CONDITIONS.items():
        entry = {"label": label, "environment": env}
        path = os.path.join(work, "eval", f"{name}.jsonl")
        if os.path.exists(path):
            row_scores = scores(path)
            entry.update(_interval(sum(row_scores), len(row_scores)))
            entry["scores"] = row_scores
        if name in kept:
            counts = [len(f) for f in kept[name]]
            seen = [any(a <= f < b for f in fs) for fs, (a, b) in zip(kept[name], spans)]
            entry.update(frames_min=min(counts), frames_max=max(counts), frames_mean=sum(counts) / len(counts))
            if name not in NO_ANSWER_SHOT:
                entry.update(answer_shot_shown=sum(seen), answer_shot_of=len(seen))
        out["conditions"][name] = entry
    for name in PRUNED:
        for suffix, stage in (("_stage2_pruner", "before stage 3"), ("", "after stage 3")):
            if name + suffix in kept:
                seen = [any(a <= f < b for f in fs) for fs, (a, b) in zip(kept[name + suffix], spans)]
                out["pruner"][f"{name}, {stage}"] = {"answer_shot_shown": sum(seen), "of": len(seen)}
    out["training"] = _training(work)
    niah = os.path.join(work, "niah", "niah_results.json")
    if os.path.exists(niah):
        out["niah"] = [{k: c[k] for k in ("frames", "depth", "accuracy", "answered") if k in c}
                       for c in json.load(open(niah))["cells"]]
    return out


def _training(work: str) -> Dict:
    out = {}
    for stage in ("stage1", "stage2", "stage3"):
        path = os.path.join(work, stage, "logging.jsonl")
        if not os.path.exists(path):
            continue
        logs = [json.loads(line) for line in open(path) if '"loss"' in line]
        steps = [entry for entry in logs if "loss" in entry and "train_loss" not in entry]
        if steps:
            out[stage] = {"first_loss": float(steps[0]["loss"]), "last_loss": float(steps[-1]["loss"]),
                          "logged": len(steps)}
            if "token_acc" in steps[-1]:
                out[stage]["last_token_acc"] = float(steps[-1]["token_acc"])
    return out


def table(res: Dict) -> str:
    lines = ["| condition | environment | frames to the LLM | answer shot among them | accuracy | 95 % CI (Wilson) |",
             "|---|---|---|---|---|---|"]
    for name, entry in res["conditions"].items():
        if "frames_mean" in entry:
            lo, hi = entry["frames_min"], entry["frames_max"]
            frames = f"{lo}" if lo == hi else f"{lo}-{hi} (mean {entry['frames_mean']:.1f})"
            shown = f"{entry['answer_shot_shown']}/{entry['answer_shot_of']}" if "answer_shot_of" in entry else "-"
        else:
            frames, shown = ("0", "-") if name == "text_only" else ("-", "-")
        if "n" in entry:
            acc = f"{entry['accuracy']:.3f} ({entry['hits']}/{entry['n']})"
            ci = f"[{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"
        else:
            acc, ci = "not run", ""
        lines.append(f"| {entry['label']} | `{entry['environment']}` | {frames} | {shown} | {acc} | {ci} |")
    if res["pruner"]:
        lines += ["", "Answer shot among the frames the pruner keeps, before and after stage 3:", ""]
        lines += [f"- {name}: {v['answer_shot_shown']}/{v['of']}" for name, v in res["pruner"].items()]
    if res["training"]:
        lines += ["", "Training:", ""]
        for stage, t in res["training"].items():
            acc = f", token accuracy {t['last_token_acc']:.3f}" if "last_token_acc" in t else ""
            lines.append(f"- {stage}: loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}{acc} "
                         f"({t['logged']} log lines)")
    if res.get("niah"):
        lines += ["", "NIAH (accuracy by frames x depth):", ""]
        lines += [f"- frames {c['frames']}, depth {c['depth']} %: {c['accuracy']}" for c in res["niah"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swift_sophia.tools.study_report", description=__doc__.split(
        "\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    frames = sub.add_parser("frames", help="write WORK/kept.json: the frames each condition shows the model")
    frames.add_argument("work")
    frames.add_argument("--frames", type=int, required=True, help="F, frames sampled per video")
    frames.add_argument("--k", type=int, required=True, help="K, the frames alpha = beta = 30 keeps")
    frames.add_argument("--budget", type=int, required=True, help="B, the frame budget")
    report = sub.add_parser("table", help="write WORK/table.md and WORK/results.json and print the table")
    report.add_argument("work")
    tokens = sub.add_parser("answer-tokens", help="print the new tokens an evaluation needs for any answer")
    tokens.add_argument("work")
    args = parser.parse_args(argv)
    if args.command == "answer-tokens":
        print(answer_tokens(args.work))
        return 0
    if args.command == "frames":
        shown = frames_shown(args.work, args.frames, args.k, args.budget)
        with open(os.path.join(args.work, "kept.json"), "w") as f:
            json.dump(shown, f)
        print("frames shown:", ", ".join(f"{n} {sorted({len(x) for x in fs})}" for n, fs in shown.items()))
        return 0
    res = results(args.work)
    text = table(res)
    with open(os.path.join(args.work, "table.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
