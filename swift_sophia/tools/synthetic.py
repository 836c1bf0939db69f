"""A synthetic video QA dataset whose answers depend on what is in the video.

Each clip has a few shots; a shot is a plain background colour with one coloured shape that drifts a little.
Questions ask for the background colour of the first or last shot, or the shape in a shot, so a model can only
answer them by looking. Clips are real H.264 mp4 files (PyAV); rows are ms-swift jsonl with absolute paths.
"""
from __future__ import annotations

import argparse
import json
import os
import random
from typing import Dict, List, Optional, Sequence

from ..video.synthetic_clips import random_clip_spec, render_clip, write_mp4

QUESTIONS = {
    "first_color": "What color is the background of the first shot? Answer with one word.",
    "last_color": "What color is the background of the last shot? Answer with one word.",
    "first_shape": "What shape appears in the first shot? Answer with one word.",
}


def answer(question: str, shots: List[dict]) -> str:
    if question == "first_color":
        return shots[0]["background"]
    if question == "last_color":
        return shots[-1]["background"]
    if question == "first_shape":
        return shots[0]["shape"]
    raise ValueError(f"unknown question {question!r}")


def make_dataset(output_dir: str, num_train: int = 64, num_val: int = 8, *, frames_per_shot: int = 6,
                 size: int = 64, seed: int = 0, questions=("first_color", "last_color")) -> Dict[str, str]:
    """Write clips under `output_dir/videos` and `train.jsonl`, `val.jsonl`; return the jsonl paths."""
    rng = random.Random(seed)
    video_dir = os.path.join(output_dir, "videos")
    os.makedirs(video_dir, exist_ok=True)
    paths = {}
    for split, count in (("train", num_train), ("val", num_val)):
        rows = []
        for i in range(count):
            shots = random_clip_spec(rng)
            video = os.path.abspath(os.path.join(video_dir, f"{split}_{i:05d}.mp4"))
            write_mp4(video, render_clip(shots, frames_per_shot, size=size, seed=rng.randrange(1 << 30)))
            q = rng.choice(list(questions))
            rows.append({
                "messages": [{"role": "user", "content": "<video>" + QUESTIONS[q]},
                             {"role": "assistant", "content": answer(q, shots)}],
                "videos": [video],
            })
        paths[split] = os.path.join(output_dir, f"{split}.jsonl")
        with open(paths[split], "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`sophia make-data DIR`."""
    parser = argparse.ArgumentParser(
        prog="sophia make-data",
        description="Synthetic video QA: short mp4 clips of coloured shots with moving shapes and questions about them "
                    "(the background colour of the first or the last shot, the shape in the first shot), as ms-swift "
                    "jsonl rows (messages + videos), written with PyAV. Nothing is downloaded.")
    parser.add_argument("output_dir", help="folder to write: train.jsonl, val.jsonl and the clips (created)")
    parser.add_argument("--num-train", type=int, default=64, help="training rows (default 64)")
    parser.add_argument("--num-val", type=int, default=8, help="held-out rows (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clips and questions (default 0)")
    args = parser.parse_args(argv)
    paths = make_dataset(args.output_dir, args.num_train, args.num_val, seed=args.seed)
    print(f"train: {paths['train']}\nval: {paths['val']}")
    return 0


__all__ = ["make_dataset", "answer", "QUESTIONS", "main"]
