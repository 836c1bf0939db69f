"""Converters from each benchmark's published files to a `general_vmcq` set (swift_sophia.evaluation.vmcq).

Each module has `convert(root, out_dir, *, annotations=None, videos=None, skip_missing=False,
check_videos=True) -> dict` (the set's `set.json`): `root` is the benchmark's folder as its authors publish it,
`annotations` / `videos` override where the question file and the video folder are looked for.
"""
from __future__ import annotations

import importlib

BENCHMARKS = {
    "videomme": "Video-MME: subsets short / medium / long (the `duration` field)",
    "mlvu": "MLVU dev, multiple-choice tasks: one subset per task (plotQA, findNeedle, ego, count, order, "
            "anomaly_reco, topic_reasoning)",
    "longvideobench": "LongVideoBench validation set: one subset per duration group (15, 60, 600, 3600 s)",
    "egoschema": "EgoSchema: the 500 questions whose answers are public (subset_answers.json)",
    "lvbench": "LVBench: one subset, every question (categories are overlapping labels, kept in each row)",
}


def converter(name: str):
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    return importlib.import_module(f"{__name__}.{name}").convert
