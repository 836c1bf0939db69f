"""Running `swift eval` (EvalScope's native backend, `general_vmcq`) on a set as a subprocess.

The server it starts inherits this process's environment, so the settings read when the model is loaded
(PRUNE_ALPHA / PRUNE_BETA, SOPHIA_HIERARCHY, chunk sizes, ...) apply to it; `env` adds or replaces some.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from typing import Dict, Optional, Sequence

from ..ms_swift.plugin_path import plugin_path


def swift_executable() -> str:
    return shutil.which("swift", path=os.path.dirname(sys.executable)) or shutil.which("swift") or "swift"


def command(model: str, dataset_args: str, output_dir: str, *, max_length: Optional[int] = None,
            eval_url: Optional[str] = None, extra: Sequence[str] = ()) -> list:
    cmd = [swift_executable(), "eval", "--model", model, "--model_type", "sophia", "--external_plugins",
           plugin_path(), "--eval_backend", "Native", "--eval_dataset", "general_vmcq",
           "--eval_dataset_args", dataset_args, "--eval_output_dir", output_dir]
    if max_length:
        cmd += ["--max_length", str(max_length)]
    if eval_url:
        cmd += ["--eval_url", eval_url]
    return cmd + list(extra)


def run(cmd: list, env: Optional[Dict[str, str]] = None, log_path: Optional[str] = None) -> int:
    full_env = dict(os.environ, **(env or {}))
    print("running: " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    if log_path is None:
        return subprocess.call(cmd, env=full_env)
    with open(log_path, "w") as log:
        return subprocess.call(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT)
