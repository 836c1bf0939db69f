"""LVBench as published: `video_info.meta.jsonl` (one line per video: {"key": YouTube id, "qa": [{"uid",
"question" with its options as "\\n(A) ...", "answer" a letter, "question_type" [labels], "time_reference"}]})
and the videos under `videos/`: `<key>.mp4`, or the authors' download script's video2dataset layout
(`videos/00000/00000000.mp4`, its url in `00000000.json` next to it or in the shard's `00000.parquet`).
"""
from __future__ import annotations

import glob
import json
import os
import re

from ..vmcq import Question, SetError, answer_letter, write_set
from ._files import first_file, read_records, require_dir

_OPTION = re.compile(r"\n\s*\(([A-Z])\)\s*")


def split_question(text: str, qid: str):
    parts = _OPTION.split(text)
    question, letters, options = parts[0], parts[1::2], [p.strip() for p in parts[2::2]]
    if len(options) < 2 or letters != [chr(ord("A") + i) for i in range(len(letters))]:
        raise SetError(f"LVBench question {qid}: cannot find the options (A) (B) ... in {text!r}")
    return question.strip(), options


def _youtube_id(url: str):
    m = re.search(r"(?:v=|youtu\.be/)([\w-]+)", url or "")
    return m.group(1) if m else None


def video_index(videos: str) -> dict:
    """{key: path} from `<key>.mp4` files and from video2dataset's records of the videos' urls: its per-video
    `<n>.json` sidecars and its per-shard `<shard>.parquet` (columns `key`, `url`)."""
    import pandas as pd

    index = {}
    for table in glob.glob(os.path.join(videos, "**", "*.parquet"), recursive=True):
        rows = pd.read_parquet(table)
        if {"key", "url"} <= set(rows.columns):
            for key, url in zip(rows["key"], rows["url"]):
                path = os.path.join(os.path.dirname(table), os.path.splitext(os.path.basename(table))[0],
                                    f"{key}.mp4")
                path = path if os.path.isfile(path) else os.path.join(os.path.dirname(table), f"{key}.mp4")
                if _youtube_id(url) and os.path.isfile(path):
                    index[_youtube_id(url)] = path
    for path in glob.glob(os.path.join(videos, "**", "*.mp4"), recursive=True):
        stem = os.path.splitext(path)[0]
        index.setdefault(os.path.basename(stem), path)
        sidecar = stem + ".json"
        if os.path.isfile(sidecar):
            with open(sidecar, encoding="utf-8") as f:
                key = _youtube_id(json.load(f).get("url"))
            if key:
                index[key] = path
    return index


def convert(root, out_dir, *, annotations=None, videos=None, skip_missing=False, check_videos=True):
    annotations = annotations or first_file("LVBench annotations", [
        os.path.join(root, "video_info.meta.jsonl"), os.path.join(root, "data", "video_info.meta.jsonl")])
    videos = require_dir(videos or os.path.join(root, "videos"), "LVBench video")
    index = video_index(videos)
    questions = []
    for video in read_records(annotations):
        key = video["key"]
        for qa in video["qa"]:
            qid = str(qa["uid"])
            question, options = split_question(qa["question"], qid)
            questions.append(Question(
                qid=qid, subset="all", question=question, options=options,
                answer=answer_letter(qa["answer"], options, qid),
                video=index.get(key, os.path.join(videos, f"{key}.mp4")),
                extra={"key": key, "question_type": qa.get("question_type", []),
                       "time_reference": qa.get("time_reference")}))
    return write_set(out_dir, questions, name="LVBench", subsets=["all"], skip_missing=skip_missing,
                     check_videos=check_videos, info={"annotations": os.path.abspath(annotations)})
