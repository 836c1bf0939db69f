"""MLVU (dev) as published: `json/<n>_<task>.json` (a list of {"video", "duration", "question", "candidates",
"answer" (the text of a candidate), "question_type"}) and the videos in `video/<n>_<task>/<video>` (the Hugging
Face copy; `video/<task>/` as in the authors' scripts also works), all under an optional `MLVU/` folder.
The generation tasks (8_sub_scene, 9_summary: no candidates) are left out.
"""
from __future__ import annotations

import glob
import os

from ..vmcq import Question, SetError, answer_letter, write_set
from ._files import first_existing, read_records, require_dir

TASKS = ("plotQA", "findNeedle", "ego", "count", "order", "anomaly_reco", "topic_reasoning")


def convert(root, out_dir, *, annotations=None, videos=None, skip_missing=False, check_videos=True):
    if not os.path.isdir(os.path.join(root, "json")) and os.path.isdir(os.path.join(root, "MLVU")):
        root = os.path.join(root, "MLVU")
    json_dir = annotations or os.path.join(root, "json")
    files = sorted(glob.glob(os.path.join(json_dir, "*.json"))) if os.path.isdir(json_dir) else [json_dir]
    if not files or not os.path.isfile(files[0]):
        raise SetError(f"MLVU annotations not found: no json/*.json under {root} (give the folder with --annotations)")
    videos = require_dir(videos or os.path.join(root, "video"), "MLVU video")
    questions, left_out = [], []
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        rows = read_records(path)
        if not rows or "candidates" not in rows[0]:
            left_out.append(stem)  # an open-ended generation task
            continue
        for i, row in enumerate(rows):
            qid = f"{stem}/{i}"
            task = row.get("question_type")
            if task not in TASKS:
                raise SetError(f"MLVU question {qid}: question_type {task!r} is not one of {TASKS}")
            options = [str(c) for c in row["candidates"]]
            tried = [os.path.join(videos, d, row["video"]) for d in (stem, task, "")]
            questions.append(Question(
                qid=qid, subset=task, question=row["question"], options=options,
                answer=answer_letter(row["answer"], options, qid), video=first_existing(tried) or tried[0],
                extra={"task": task, "duration": row.get("duration"), "video_name": row["video"]}))
    return write_set(out_dir, questions, name="MLVU", subsets=TASKS, skip_missing=skip_missing,
                     check_videos=check_videos, info={"left_out_tasks": left_out,
                                                      "note": "MLVU's M-Avg is the mean over tasks: macro_score"})
