"""Running the real `swift` CLIs as subprocesses, the way users do."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from swift_sophia.ms_swift.plugin_path import plugin_path

SWIFT = shutil.which("swift", path=str(Path(sys.executable).parent)) or "swift"
# CPU-friendly settings shared by every training run in the tests.
CPU_TRAIN = ["--fp16", "false", "--bf16", "false", "--check_model", "false", "--dataloader_num_workers", "0",
             "--report_to", "none", "--split_dataset_ratio", "0", "--gradient_checkpointing", "false",
             "--add_version", "false", "--save_only_model", "true"]


def env(**extra):
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONUNBUFFERED="1", **extra)
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def swift(*args, timeout=600, cwd=None, input=None, extra_env=None):
    """Run `swift <args>`; fail with the tail of its output if it fails."""
    cmd = [SWIFT, *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**(extra_env or {})),
                          cwd=cwd, input=input)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def sft(model, dataset, output_dir, *extra, timeout=600):
    swift("sft", "--model", model, "--model_type", "sophia", "--external_plugins", plugin_path(),
          "--dataset", dataset, "--output_dir", output_dir, *CPU_TRAIN, *extra, timeout=timeout)
    return os.path.join(output_dir, "last-checkpoint")


def train_losses(output_dir):
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "logging.jsonl"))]
    return [float(r["loss"]) for r in rows if "loss" in r and "train_runtime" not in r]
