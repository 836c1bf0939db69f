"""A local video multiple-choice set in EvalScope's `general_vmcq` layout, ready for `swift eval`.

A set is a folder with one `{subset}_val.jsonl` per subset (EvalScope scores each subset and the whole), one row
per question::

    {"question": "<video 1>\\nWhat ...?", "options": ["...", "..."], "answer": "B", "video_1": "/abs/clip.mp4",
     "id": "<the benchmark's question id>", ...the benchmark's own fields...}

plus `eval_dataset_args.json` (give it to `swift eval --eval_dataset_args`) and `set.json` (what was written:
subsets, counts, questions left out and why). Every video is checked before anything is written: a missing or
unreadable one is an error naming the question id and the path (or, with `skip_missing`, the question is left out
and listed in `set.json`).
"""
from __future__ import annotations

import json
import os
import re
import string
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

# EvalScope's single-answer template without "think step by step": benchmarks ask for the letter directly, and
# the reply's `ANSWER: X` (or its last capital letter) is the prediction.
PROMPT_TEMPLATE = (
    "Answer the following multiple choice question about the video. The entire content of your response should be "
    "of the following format: 'ANSWER: [LETTER]' (without quotes) where [LETTER] is one of {letters}.\n\n"
    "{question}\n\n{choices}")
LETTERS = string.ascii_uppercase
_LETTER_PREFIX = re.compile(r"^\s*\(?([A-Z])\)?\s*[.:)]\s*")


class SetError(ValueError):
    """A benchmark file or video that cannot be turned into a set; the message names the question and path."""


@dataclass
class Question:
    qid: str
    subset: str
    question: str
    options: List[str]
    answer: str  # a letter
    video: str
    extra: Dict = field(default_factory=dict)

    def row(self) -> Dict:
        return {"question": "<video 1>\n" + self.question.strip(), "options": self.options, "answer": self.answer,
                "video_1": os.path.abspath(self.video), "id": self.qid, **self.extra}


def strip_letters(options: Sequence[str], qid: str) -> List[str]:
    """["A. red", "B. blue"] -> ["red", "blue"] (EvalScope adds the letters); options without letters unchanged."""
    options = [str(o) for o in options]
    found = [_LETTER_PREFIX.match(o) for o in options]
    if all(found):
        if [m.group(1) for m in found] != list(LETTERS[:len(options)]):
            raise SetError(f"question {qid}: options are lettered out of order: {options}")
        return [o[m.end():].strip() for o, m in zip(options, found)]
    return [o.strip() for o in options]


def answer_letter(answer, options: Sequence[str], qid: str) -> str:
    """The answer as a letter, given as a letter, a 0-based index or the text of an option."""
    if isinstance(answer, bool):
        raise SetError(f"question {qid}: answer {answer!r} is not a letter, an index or an option")
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        i = int(answer)
        if not 0 <= i < len(options):
            raise SetError(f"question {qid}: answer index {i} is out of range for {len(options)} options")
        return LETTERS[i]
    text = str(answer).strip()
    m = re.fullmatch(r"\(?([A-Z])\)?\.?", text)
    if m and LETTERS.index(m.group(1)) < len(options):
        return m.group(1)
    matches = [i for i, o in enumerate(options) if o.strip() == text]
    if len(matches) == 1:
        return LETTERS[matches[0]]
    raise SetError(f"question {qid}: answer {answer!r} is neither a letter nor one of the options {list(options)}")


def check_video(path: str, decode: bool = True) -> Optional[str]:
    """None if `path` is a readable video, else the reason."""
    if not os.path.isfile(path):
        return f"video file not found: {path}"
    if os.path.getsize(path) == 0:
        return f"video file is empty: {path}"
    if decode:
        import av

        try:
            with av.open(path) as container:
                if not container.streams.video:
                    return f"no video stream in {path}"
        except Exception as exc:  # noqa: BLE001  (any PyAV error means the server could not read it either)
            return f"cannot open video {path}: {str(exc).splitlines()[0]}"
    return None


def eval_dataset_args(out_dir: str, subsets: Iterable[str]) -> Dict:
    return {"general_vmcq": {"local_path": os.path.abspath(out_dir), "subset_list": list(subsets),
                             "prompt_template": PROMPT_TEMPLATE}}


def write_set(out_dir: str, questions: List[Question], *, name: str, subsets: Optional[Sequence[str]] = None,
              skip_missing: bool = False, check_videos: bool = True, info: Optional[Dict] = None) -> Dict:
    """Check every video, write the subset files, `eval_dataset_args.json` and `set.json`; return `set.json`."""
    if not questions:
        raise SetError(f"{name}: no questions to write")
    skipped, kept = [], []
    for q in questions:
        if not q.options or len(q.options) > len(LETTERS):
            raise SetError(f"question {q.qid}: {len(q.options)} options")
        problem = check_video(q.video, decode=check_videos)
        if problem is None:
            kept.append(q)
        elif skip_missing:
            skipped.append({"id": q.qid, "subset": q.subset, "reason": problem})
        else:
            raise SetError(f"{name} question {q.qid} ({q.subset}): {problem}")
    if not kept:
        raise SetError(f"{name}: none of the {len(questions)} questions has a readable video "
                       f"(first: {skipped[0]['reason']})")
    order = list(subsets) if subsets else sorted({q.subset for q in kept})
    by_subset = {s: [q for q in kept if q.subset == s] for s in order}
    unknown = {q.subset for q in kept} - set(order)
    if unknown:
        raise SetError(f"{name}: questions in subsets {sorted(unknown)} outside {order}")
    order = [s for s in order if by_subset[s]]  # EvalScope cannot score an empty subset
    os.makedirs(out_dir, exist_ok=True)
    for s in order:
        with open(os.path.join(out_dir, f"{s}_val.jsonl"), "w", encoding="utf-8") as f:
            for q in by_subset[s]:
                f.write(json.dumps(q.row(), ensure_ascii=False) + "\n")
    args = eval_dataset_args(out_dir, order)
    with open(os.path.join(out_dir, "eval_dataset_args.json"), "w", encoding="utf-8") as f:
        json.dump(args, f, indent=1, ensure_ascii=False)
    summary = {"benchmark": name, "subsets": {s: len(by_subset[s]) for s in order}, "questions": len(kept),
               "skipped": skipped, **(info or {})}
    with open(os.path.join(out_dir, "set.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    return summary


def swift_eval_command(out_dir: str, model: str = "CHECKPOINT") -> str:
    return (f"swift eval --model {model} --eval_backend Native --eval_dataset general_vmcq "
            f"--eval_dataset_args {os.path.join(os.path.abspath(out_dir), 'eval_dataset_args.json')} "
            f"--eval_output_dir eval_output")
