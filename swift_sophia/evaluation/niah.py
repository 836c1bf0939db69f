"""`sophia niah`: video needle-in-a-haystack on a checkpoint.

For every haystack size (frames) and needle depth, an N-frame video with the needle inserted at that depth and the
needle's multiple-choice question; the checkpoint answers them through `swift eval` (the same path as every other
evaluation: ms-swift's server, EvalScope's `general_vmcq`), and the accuracy of every cell is drawn as a heatmap of
depth against frames. Cells whose prompt exceeds the server's max_length are not sent, and are marked.

    sophia niah --model CKPT --output-dir niah                     # generated haystack and needle
    sophia niah --model CKPT --output-dir niah --haystack film.mp4 --needle cat.png \\
        --question "What animal appears in the video?" --option dog --option cat --option bird --answer cat
    sophia niah --model CKPT --output-dir niah --haystack film.mp4 --needles needles.jsonl --samples 6

--needles: one needle a line, {"needle": "red_circle.mp4", "question": "...", "options": ["red", "green", ...],
"answer": "red", "needle_frames": 4} (an image or a clip, relative to the file's folder; the answer a letter or an
option's text; needle_frames optional). Sample s of the c-th cell (cells in --frames, then --depths order) asks
needle (c x samples + s) mod their number: over the grid every needle is asked as often as any other (within one),
and in every cell too when --samples is a multiple of their number. A file in which any --samples lines in a row
have balanced answers gives balanced answers in every cell (`sophia synthetic-shots --niah-inputs` writes a haystack
and needles of its task so: any 6 needles in a row ask the 6 colours).

The server gets VIDEO_SEGMENTS = the largest haystack, so each N-frame video is read whole (every frame once);
everything else in the environment (ablations: PRUNE_ALPHA, PRUNE_BETA, SOPHIA_HIERARCHY, ...) is passed on.
Written: OUTPUT_DIR/set (the questions), videos/, eval/ (EvalScope's run), niah_results.json, niah_heatmap.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
from typing import Optional, Sequence

DEFAULT_FRAMES = "32,64,128,256,512,1024,2048"
DEFAULT_DEPTHS = "0,25,50,75,100"


def _ints(text: str, what: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} must be comma-separated integers, got {text!r}")
    if not values:
        raise SystemExit(f"error: no {what} given")
    return values


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="the checkpoint (its tokenizer also counts prompt tokens)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--frames", default=DEFAULT_FRAMES, help=f"haystack sizes in frames (default {DEFAULT_FRAMES})")
    parser.add_argument("--depths", default=DEFAULT_DEPTHS, help=f"needle depths in %% (default {DEFAULT_DEPTHS})")
    parser.add_argument("--haystack", help="a video to take the haystack frames from (default: generated shots)")
    parser.add_argument("--needle", help="an image or a short clip (default: a generated pattern frame)")
    parser.add_argument("--needles", help="a jsonl file of needles, one a line: {\"needle\": image or clip, "
                                          "\"question\", \"options\": [...], \"answer\", optional "
                                          "\"needle_frames\"}; the cells' samples take them in turn "
                                          "(instead of --needle, --question, --option, --answer)")
    parser.add_argument("--needle-frames", type=int, help="frames the needle spans (image: repeated, default 1; "
                                                          "clip: sampled, default all up to 16; with --needles: for "
                                                          "the lines without needle_frames)")
    parser.add_argument("--question", help="the question about the needle (with --needle)")
    parser.add_argument("--option", action="append", default=[], help="an answer option (repeat; with --needle)")
    parser.add_argument("--answer", help="the right option: its letter or its text (with --needle)")
    parser.add_argument("--samples", type=int, default=1,
                        help="questions per cell (generated needles or --needles; a multiple of the number of "
                             "--needles asks each of them in every cell)")
    parser.add_argument("--size", type=int, help="frame size in pixels (default: the model's input size)")
    parser.add_argument("--fps", type=float, default=1.0, help="frame rate written in the haystack videos")
    parser.add_argument("--max-length", type=int, help="the server's max_length (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-url", help="evaluate through a running server (e.g. http://127.0.0.1:8000/v1) "
                                           "instead of starting one; it must read whole videos (VIDEO_SEGMENTS)")
    parser.add_argument("--swift-args", default="", help="more `swift eval` arguments, one string, e.g. "
                                                         "\"--infer_backend vllm --max_new_tokens 16\"")
    parser.add_argument("--skip-eval", action="store_true", help="build the set and count tokens only")


def check_needle_arguments(args) -> None:
    """--needles replaces the single needle's flags; a single needle's flags need --needle."""
    single = {"--needle": args.needle, "--question": args.question, "--option": args.option, "--answer": args.answer}
    if args.needles:
        clash = [flag for flag, value in single.items() if value]
        if clash:
            raise SystemExit(f"error: --needles cannot go with {', '.join(clash)}: each line of the --needles file "
                             f"gives its needle, question, options and answer")
    elif not args.needle and (args.question or args.option or args.answer):
        raise SystemExit("error: --question / --option / --answer go with --needle")


def _prompt_tokens(lengths, questions, n: int) -> int:
    """The longest prompt among a cell's questions, with its n-frame video: the cell is sent only if that fits (the
    questions of several needles may differ in length)."""
    prompts = {(row["question"], tuple(row["options"])) for row in (q.row() for q in questions)}
    return max(lengths.tokens(question, list(options), n) for question, options in prompts)


def build(args) -> dict:
    """Write the set (videos, subset files) and the manifest: every cell's prompt tokens, beyond max_length or not."""
    from .niah_set import build_cells, cell_name, load_needle, load_needles
    from .prompt_length import PromptLength
    from .vmcq import write_set

    frames, depths = sorted(set(_ints(args.frames, "--frames"))), _ints(args.depths, "--depths")
    if any(not 0 <= d <= 100 for d in depths):
        raise SystemExit("error: --depths are percentages from 0 to 100")
    check_needle_arguments(args)
    lengths = PromptLength(args.model)
    max_length = args.max_length or lengths.max_model_len
    size = args.size or lengths.size
    needles = []
    if args.needles:
        needles = load_needles(args.needles, size, args.needle_frames)
    elif args.needle:
        needles = [load_needle(args.needle, size, args.needle_frames, args.question, args.option, args.answer)]
    out = os.path.abspath(args.output_dir)
    questions = build_cells(out, frames=frames, depths=depths, size=size, haystack=args.haystack, needles=needles,
                            samples=args.samples, fps=args.fps, seed=args.seed)
    cells = []
    for n in frames:
        for d in depths:
            name = cell_name(n, d)
            tokens = _prompt_tokens(lengths, [q for q in questions if q.subset == name], n)
            cells.append({"cell": name, "frames": n, "depth": d, "prompt_tokens": tokens,
                          "beyond_max_length": bool(max_length and tokens > max_length)})
    sent = [c["cell"] for c in cells if not c["beyond_max_length"]]
    set_dir = os.path.join(out, "set")
    if sent:
        write_set(set_dir, [q for q in questions if q.subset in sent], name="niah", subsets=sent,
                  check_videos=False)
    manifest = {"frames": frames, "depths": depths, "max_length": max_length,
                "tokens_per_frame": lengths.tokens_per_frame, "samples": args.samples, "cells": cells,
                "set": set_dir if sent else None,
                "needle": args.needles or args.needle or "generated pattern", "num_needles": len(needles) or None,
                "haystack": args.haystack or "generated shots"}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def evaluate(args, manifest: dict) -> str:
    from . import swift_eval

    eval_dir = os.path.join(os.path.abspath(args.output_dir), "eval")
    env = {"VIDEO_SEGMENTS": str(max(manifest["frames"]))}
    if os.environ.get("VIDEO_SEGMENTS") not in (None, env["VIDEO_SEGMENTS"]):
        print(f"note: VIDEO_SEGMENTS={os.environ['VIDEO_SEGMENTS']} replaced by {env['VIDEO_SEGMENTS']} for the "
              f"server (each haystack is read whole)")
    cmd = swift_eval.command(args.model, os.path.join(manifest["set"], "eval_dataset_args.json"), eval_dir,
                             max_length=manifest["max_length"], eval_url=args.eval_url,
                             extra=shlex.split(args.swift_args))
    log = os.path.join(os.path.abspath(args.output_dir), "swift_eval.log")
    code = swift_eval.run(cmd, env=env, log_path=log)
    if code != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"error: swift eval exited {code}; its log: {log}\n{tail}")
    return eval_dir


def collect(args, manifest: dict, eval_dir) -> dict:
    import numpy as np

    from .heatmap import draw
    from .report import latest_run, subset_scores

    scores = subset_scores(latest_run(eval_dir)) if eval_dir else {}
    frames, depths = manifest["frames"], manifest["depths"]
    accuracy = np.full((len(depths), len(frames)), np.nan)
    beyond = np.zeros_like(accuracy, dtype=bool)
    for c in manifest["cells"]:
        i, j = depths.index(c["depth"]), frames.index(c["frames"])
        beyond[i, j] = c["beyond_max_length"]
        got = scores.get(c["cell"])
        c["accuracy"], c["answered"] = (got["score"], got["num"]) if got else (None, 0)
        if got:
            accuracy[i, j] = got["score"]
    out = os.path.abspath(args.output_dir)
    heatmap = os.path.join(out, "niah_heatmap.png")
    draw(heatmap, frames, depths, accuracy, beyond, max_length=manifest["max_length"])
    results = dict(manifest, heatmap=heatmap, eval_output_dir=eval_dir)
    with open(os.path.join(out, "niah_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def run(args) -> int:
    from .vmcq import SetError

    try:
        manifest = build(args)
    except SetError as exc:
        print(f"error: {exc}")
        return 1
    beyond = [c["cell"] for c in manifest["cells"] if c["beyond_max_length"]]
    print(f"{len(manifest['cells'])} cells, {len(beyond)} beyond max_length {manifest['max_length']}"
          + (f": {', '.join(beyond)}" if beyond else ""))
    eval_dir = None
    if not args.skip_eval and manifest["set"]:
        eval_dir = evaluate(args, manifest)
    results = collect(args, manifest, eval_dir)
    unanswered = [c["cell"] for c in results["cells"] if eval_dir and not c["beyond_max_length"] and not c["answered"]]
    if unanswered:
        print(f"cells with no score: {', '.join(unanswered)}")
    saved = os.path.join(os.path.abspath(args.output_dir), "niah_results.json")
    print(f"heatmap: {results['heatmap']}\nresults: {saved}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`sophia niah`."""
    parser = argparse.ArgumentParser(prog="sophia niah", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
