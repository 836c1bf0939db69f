"""EgoSchema as published: `questions.json` (a list of {"q_uid", "question", "option 0" ... "option 4"}),
`subset_answers.json` ({q_uid: 0-based answer}, the 500 public answers) and the videos in `videos/<q_uid>.mp4`.
Only questions with a public answer are written (the full set is scored by the authors' Kaggle leaderboard).
"""
from __future__ import annotations

import json
import os

from ..vmcq import Question, SetError, answer_letter, write_set
from ._files import first_file, read_records, require_dir


def convert(root, out_dir, *, annotations=None, videos=None, skip_missing=False, check_videos=True):
    annotations = annotations or first_file("EgoSchema questions", [os.path.join(root, "questions.json")])
    answers_path = os.path.join(os.path.dirname(annotations), "subset_answers.json")
    if not os.path.isfile(answers_path):
        raise SetError(f"EgoSchema answers not found: {answers_path} (only subset_answers.json has public answers)")
    with open(answers_path, encoding="utf-8") as f:
        answers = json.load(f)
    videos = require_dir(videos or os.path.join(root, "videos"), "EgoSchema video")
    questions = []
    for row in read_records(annotations):
        qid = row["q_uid"]
        if qid not in answers:
            continue
        options = [str(row[f"option {i}"]) for i in range(5) if f"option {i}" in row]
        questions.append(Question(qid=qid, subset="subset", question=row["question"], options=options,
                                  answer=answer_letter(int(answers[qid]), options, qid),
                                  video=os.path.join(videos, f"{qid}.mp4")))
    missing = sorted(set(answers) - {q.qid for q in questions})
    if missing:
        raise SetError(f"EgoSchema: {len(missing)} answered questions are not in {annotations} (first: {missing[0]})")
    return write_set(out_dir, questions, name="EgoSchema", subsets=["subset"], skip_missing=skip_missing,
                     check_videos=check_videos, info={"annotations": os.path.abspath(annotations)})
