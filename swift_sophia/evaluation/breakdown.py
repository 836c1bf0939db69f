"""Accuracy by any field of a set's rows, from a `swift eval` run: the breakdowns that are not subsets.

A benchmark's categories can overlap (an LVBench question can be "reasoning" and "temporal grounding"), so they
cannot be EvalScope subsets; they stay in each row of the set. Here EvalScope's reviews (one per question asked,
`index` = the row's line in its subset file) are joined with the rows, and each value of a field (each label of a
list field) gets the accuracy of the questions that carry it. Questions that got no review are listed by id.

    sophia eval-breakdown SET_DIR EVAL_OUTPUT_DIR [--by FIELD ...]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

from .report import latest_run

DEFAULT_FIELDS = {"Video-MME": ["duration", "domain", "task_type"], "MLVU": ["task"],
                  "LongVideoBench": ["duration_group", "question_category"], "EgoSchema": [],
                  "LVBench": ["question_type"], "niah": ["frames", "depth"]}


def _reviews(run_dir: str, subset: str) -> Dict[int, float]:
    found = sorted(glob.glob(os.path.join(run_dir, "reviews", "*", f"general_vmcq_{subset}.jsonl")))
    scores = {}
    for path in found[:1]:
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                scores[int(row["index"])] = float(row["sample_score"]["score"]["value"]["acc"])
    return scores


def breakdown(set_dir: str, eval_output_dir: str, fields: Optional[Sequence[str]] = None) -> Dict:
    with open(os.path.join(set_dir, "set.json"), encoding="utf-8") as f:
        summary = json.load(f)
    fields = list(fields) if fields is not None else DEFAULT_FIELDS.get(summary["benchmark"], [])
    run_dir = latest_run(eval_output_dir)
    tallies = {name: defaultdict(lambda: [0.0, 0]) for name in fields}
    unscored: List[str] = []
    scored = correct = 0
    for subset in summary["subsets"]:
        scores = _reviews(run_dir, subset)
        with open(os.path.join(set_dir, f"{subset}_val.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for i, row in enumerate(rows):
            if i not in scores:
                unscored.append(row.get("id", f"{subset}/{i}"))
                continue
            scored, correct = scored + 1, correct + scores[i]
            for name in fields:
                values = row.get(name)
                for value in values if isinstance(values, list) else [values]:
                    tally = tallies[name][str(value)]
                    tally[0] += scores[i]
                    tally[1] += 1
    result = {"benchmark": summary["benchmark"], "run": run_dir, "questions": summary["questions"],
              "scored": scored, "accuracy": correct / scored if scored else None, "unscored": unscored,
              "by": {name: {v: {"accuracy": s / n, "num": n} for v, (s, n) in sorted(t.items())}
                     for name, t in tallies.items()}}
    with open(os.path.join(run_dir, "breakdown.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    return result


def add_arguments(parser):
    parser.add_argument("set_dir", help="the set (written by `sophia convert-benchmark`)")
    parser.add_argument("eval_output_dir", help="the --eval_output_dir of the `swift eval` run (its newest run)")
    parser.add_argument("--by", action="append", help="a field of the rows (repeat); default: the benchmark's "
                                                      "own categories")


def run(args) -> int:
    result = breakdown(args.set_dir, args.eval_output_dir, args.by)
    print(json.dumps({k: result[k] for k in ("benchmark", "scored", "accuracy", "by")}, indent=1))
    if result["unscored"]:
        print(f"{len(result['unscored'])} questions without a score: {', '.join(result['unscored'][:20])}")
    print(f"written: {os.path.join(result['run'], 'breakdown.json')}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`sophia eval-breakdown`."""
    parser = argparse.ArgumentParser(prog="sophia eval-breakdown", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
