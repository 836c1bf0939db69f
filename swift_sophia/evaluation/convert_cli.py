"""`sophia convert-benchmark NAME ROOT OUT`: a benchmark's published files -> a `general_vmcq` set for swift eval."""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from .benchmarks import BENCHMARKS, converter
from .vmcq import SetError, swift_eval_command


def add_arguments(parser):
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS),
                        help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("root", help="the benchmark's folder, as its authors publish it")
    parser.add_argument("output_dir", help="where the set is written ({subset}_val.jsonl, eval_dataset_args.json)")
    parser.add_argument("--annotations", help="the question file (or MLVU's json folder), if not where the "
                                              "published layout has it")
    parser.add_argument("--videos", help="the video folder, if not where the published layout has it")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out questions whose video is missing or unreadable (listed in set.json) "
                             "instead of stopping at the first")
    parser.add_argument("--no-check-videos", action="store_true",
                        help="only check that video files exist and are not empty (no PyAV open)")


def run(args) -> int:
    try:
        summary = converter(args.benchmark)(args.root, args.output_dir, annotations=args.annotations,
                                            videos=args.videos, skip_missing=args.skip_missing,
                                            check_videos=not args.no_check_videos)
    except SetError as exc:
        print(f"error: {exc}")
        return 1
    print(json.dumps({k: summary[k] for k in ("benchmark", "questions", "subsets")}))
    for item in summary["skipped"]:
        print(f"left out {item['id']} ({item['subset']}): {item['reason']}")
    print("evaluate with:\n  " + swift_eval_command(args.output_dir))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`sophia convert-benchmark`."""
    parser = argparse.ArgumentParser(prog="sophia convert-benchmark", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
