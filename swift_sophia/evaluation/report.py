"""Reading what `swift eval` (EvalScope's native backend) wrote for a `general_vmcq` run.

`EVAL_OUTPUT_DIR/native/<time>/reports/<model>/general_vmcq.json` holds the scores (per subset and overall);
`predictions/<model>/general_vmcq_<subset>.jsonl` one row per question asked, in the order of the subset file.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Optional


def latest_run(eval_output_dir: str) -> str:
    """The newest `native/<time>` folder under a `--eval_output_dir`."""
    runs = sorted(glob.glob(os.path.join(eval_output_dir, "native", "*", "reports")))
    if not runs:
        raise FileNotFoundError(f"no EvalScope report under {eval_output_dir}/native/*/reports "
                                f"(did `swift eval` finish?)")
    return os.path.dirname(runs[-1])


def report_path(run_dir: str, dataset: str = "general_vmcq") -> str:
    found = sorted(glob.glob(os.path.join(run_dir, "reports", "*", f"{dataset}.json")))
    if not found:
        raise FileNotFoundError(f"no report {dataset}.json under {run_dir}/reports")
    return found[0]


def subset_scores(run_dir: str, dataset: str = "general_vmcq") -> Dict[str, Dict]:
    """{subset: {"score": accuracy, "num": questions scored}} from the run's report."""
    with open(report_path(run_dir, dataset), encoding="utf-8") as f:
        report = json.load(f)
    scores = {}
    for metric in report["metrics"]:
        for category in metric["categories"]:
            for subset in category["subsets"]:
                scores[subset["name"]] = {"score": float(subset["score"]), "num": int(subset["num"])}
    return scores


def overall(run_dir: str, dataset: str = "general_vmcq") -> Dict[str, float]:
    with open(report_path(run_dir, dataset), encoding="utf-8") as f:
        report = json.load(f)
    metric = report["metrics"][0]
    return {"score": float(metric["score"]), "macro_score": float(metric.get("macro_score", metric["score"])),
            "num": int(metric["num"])}


def predictions(run_dir: str, subset: str, dataset: str = "general_vmcq") -> Optional[list]:
    """The rows EvalScope recorded for a subset (index, model output), or None when it wrote none."""
    found = sorted(glob.glob(os.path.join(run_dir, "predictions", "*", f"{dataset}_{subset}.jsonl")))
    if not found:
        return None
    with open(found[0], encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
