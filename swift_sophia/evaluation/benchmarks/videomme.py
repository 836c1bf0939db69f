"""Video-MME as published (lmms-lab/Video-MME): `videomme/test-00000-of-00001.parquet` with one row per question
(`question_id`, `videoID`, `duration` short / medium / long, `domain`, `sub_category`, `task_type`, `question`,
`options` as "A. ...", `answer` a letter) and the videos in `data/<videoID>.mp4` (.MP4 / .mkv as extracted).
"""
from __future__ import annotations

import os

from ..vmcq import Question, SetError, answer_letter, strip_letters, write_set
from ._files import first_existing, first_file, read_records, require_dir

DURATIONS = ("short", "medium", "long")


def convert(root, out_dir, *, annotations=None, videos=None, skip_missing=False, check_videos=True):
    annotations = annotations or first_file("Video-MME annotations", [
        os.path.join(root, "videomme", "test-*.parquet"), os.path.join(root, "videomme", "*.parquet"),
        os.path.join(root, "*.parquet"), os.path.join(root, "videomme", "*.json"), os.path.join(root, "*.json")])
    videos = require_dir(videos or os.path.join(root, "data"), "Video-MME video")
    questions = []
    for row in read_records(annotations):
        qid = str(row.get("question_id") or row.get("id"))
        if row.get("duration") not in DURATIONS:
            raise SetError(f"Video-MME question {qid}: duration {row.get('duration')!r} is not one of {DURATIONS}")
        options = strip_letters(row["options"], qid)
        tried = [os.path.join(videos, f"{row['videoID']}{ext}") for ext in (".mp4", ".MP4", ".mkv")]
        questions.append(Question(
            qid=qid, subset=row["duration"], question=row["question"], options=options,
            answer=answer_letter(row["answer"], options, qid), video=first_existing(tried) or tried[0],
            extra={k: row.get(k) for k in ("video_id", "videoID", "duration", "domain", "sub_category", "task_type")}))
    return write_set(out_dir, questions, name="Video-MME", subsets=DURATIONS, skip_missing=skip_missing,
                     check_videos=check_videos, info={"annotations": os.path.abspath(annotations)})
