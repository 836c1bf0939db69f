"""LongVideoBench as published: `lvb_val.json` (a list of {"id", "video_id", "video_path", "question",
"candidates", "correct_choice" (0-based), "duration_group" (15 / 60 / 600 / 3600), "question_category", ...}) and
the videos in `videos/<video_path>`. The test file (`lvb_test_wo_gt.json`) has no answers.
"""
from __future__ import annotations

import os

from ..vmcq import Question, SetError, answer_letter, write_set
from ._files import first_file, read_records, require_dir


def convert(root, out_dir, *, annotations=None, videos=None, skip_missing=False, check_videos=True):
    annotations = annotations or first_file("LongVideoBench annotations", [os.path.join(root, "lvb_val.json")])
    videos = require_dir(videos or os.path.join(root, "videos"), "LongVideoBench video")
    questions = []
    for row in read_records(annotations):
        qid = str(row["id"])
        if "correct_choice" not in row:
            raise SetError(f"LongVideoBench question {qid} in {annotations} has no correct_choice (the test set "
                           f"has no public answers; use lvb_val.json)")
        options = [str(c) for c in row["candidates"]]
        group = int(row["duration_group"])
        questions.append(Question(
            qid=qid, subset=f"duration_{group}", question=row["question"], options=options,
            answer=answer_letter(int(row["correct_choice"]), options, qid),
            video=os.path.join(videos, row["video_path"]),
            extra={k: row.get(k) for k in ("video_id", "duration_group", "question_category", "duration")}))
    groups = sorted({int(q.subset.split("_")[1]) for q in questions})
    return write_set(out_dir, questions, name="LongVideoBench", subsets=[f"duration_{g}" for g in groups],
                     skip_missing=skip_missing, check_videos=check_videos,
                     info={"annotations": os.path.abspath(annotations)})
