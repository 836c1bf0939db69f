"""Reading benchmark annotation files (json, jsonl, parquet) and finding the first path that exists."""
from __future__ import annotations

import glob
import json
import os
from typing import List, Optional, Sequence

from ..vmcq import SetError


def read_records(path: str) -> List[dict]:
    if path.endswith(".parquet"):
        import pandas as pd

        return json.loads(pd.read_parquet(path).to_json(orient="records"))
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        data = json.load(f)
    if not isinstance(data, list):
        raise SetError(f"{path}: expected a list of questions, found {type(data).__name__}")
    return data


def first_file(what: str, candidates: Sequence[str]) -> str:
    for pattern in candidates:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    raise SetError(f"{what} not found; looked for: {', '.join(candidates)} (give it with --annotations)")


def first_existing(paths: Sequence[str]) -> Optional[str]:
    return next((p for p in paths if os.path.isfile(p)), None)


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise SetError(f"{what} folder not found: {path} (give it with --videos)")
    return path
