"""`swift sft --resume_from_checkpoint`: the recipes' checkpoints resume exactly, a model-only one is refused."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from swift_cli import CPU_TRAIN, SWIFT, env, swift
from swift_sophia.ms_swift.plugin_path import plugin_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPES = ["quickstart.sh", "cpu_multiprocess.sh", "train_8gpu/stage1_align.sh", "train_8gpu/stage2_finetune.sh",
           "train_8gpu/stage3_prune.sh"]
STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:]}) + "\\n")
if sys.argv[1:] == ["plugin-path"]:
    print("/plugin/sophia.py")
"""


def recipe_sft_commands(script, tmp_path):
    """The arguments of each `swift sft` the example script runs (`swift`, `sophia`, `python` are stubs)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for name in ("swift", "sophia", "python"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    run_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", STUB_LOG=str(log), MODEL="/ckpt",
                   DATA_DIR="/data", OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(REPO / "examples" / script), str(tmp_path / "work")], env=run_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in open(log)]
    return [c["argv"][1:] for c in calls if c["prog"] == "swift" and c["argv"][:1] == ["sft"]]


def logged_steps(output_dir):
    """{step: (loss, learning rate)} of the training steps logged in output_dir/logging.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(output_dir, "logging.jsonl"))]
    return {int(r["global_step/max_steps"].split("/")[0]): (float(r["loss"]), float(r["learning_rate"]))
            for r in rows if "loss" in r and "train_runtime" not in r}


def sft_raw(*args):
    proc = subprocess.run([SWIFT, "sft", *map(str, args)], capture_output=True, text=True, env=env(), timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", RECIPES)
def test_recipes_save_what_resuming_needs(script, tmp_path):
    from swift.arguments import SftArguments
    from transformers import HfArgumentParser

    commands = recipe_sft_commands(script, tmp_path)
    assert commands
    for argv in commands:
        ns, _ = HfArgumentParser(SftArguments).parse_known_args(argv)
        assert ns.save_only_model is False, f"{script} saves model-only checkpoints: {' '.join(argv)}"


def test_quickstart_stage2_resumes_exactly(tiny_model_dir, synthetic_data, tmp_path):
    """The quickstart's stage-2 command as written (stage 1 shares its save flags; stage 2 has the warmup and the
    cosine schedule a restart would show), on the tiny model for 6 steps, saving at step 3. Resumed from that
    checkpoint (what a run killed after step 3 leaves), steps 4-6 have the uninterrupted run's losses and learning
    rates: the optimizer, the schedule, the data position and the RNG all resume."""
    argv = recipe_sft_commands("quickstart.sh", tmp_path)[1]
    # later flags win in ms-swift's parser: the recipe's flags, on our model and data, shorter
    short = ["--model", tiny_model_dir, "--external_plugins", plugin_path(), "--dataset", synthetic_data["train"],
             "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--save_total_limit", "2",
             "--logging_steps", "1"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    swift("sft", *argv, *short, "--output_dir", full)
    swift("sft", *argv, *short, "--output_dir", resumed, "--resume_from_checkpoint", full / "checkpoint-3")
    uninterrupted, after_resume = logged_steps(full), logged_steps(resumed)
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6] and sorted(after_resume) == [4, 5, 6], after_resume
    assert after_resume == {s: uninterrupted[s] for s in (4, 5, 6)}, (uninterrupted, after_resume)


def test_model_only_checkpoint_is_refused_unless_resume_only_model(tiny_model_dir, synthetic_data, tmp_path):
    common = ["--model", tiny_model_dir, "--model_type", "sophia", "--external_plugins", plugin_path(),
              "--dataset", synthetic_data["train"], *CPU_TRAIN,  # CPU_TRAIN saves model-only checkpoints
              "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "1"]
    swift("sft", *common, "--max_steps", "1", "--output_dir", tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoint-1"
    rc, log = sft_raw(*common, "--max_steps", "2", "--output_dir", tmp_path / "refused",
                      "--resume_from_checkpoint", ckpt)
    assert rc != 0, log[-3000:]
    message = next((line for line in log.splitlines() if "cannot resume training" in line), log[-3000:])
    for words in (f"--resume_from_checkpoint {ckpt} cannot resume training", "optimizer state (optimizer.pt)",
                  "learning-rate scheduler state (scheduler.pt)", "RNG state (rng_state.pth)",
                  "saved with --save_only_model true", "--save_only_model false", "--resume_only_model true"):
        assert words in message, message
    assert not (tmp_path / "refused" / "logging.jsonl").exists()  # refused before any step
    # The explicit choice to take its weights only goes on from the saved step (ms-swift skips the data seen).
    swift("sft", *common, "--max_steps", "2", "--output_dir", tmp_path / "weights_only",
          "--resume_from_checkpoint", ckpt, "--resume_only_model", "true")
    assert sorted(logged_steps(tmp_path / "weights_only")) == [2]


def test_what_a_checkpoint_lacks(tmp_path, monkeypatch):
    """The files each setup needs (without training): DeepSpeed keeps the optimizer in global_step*/, a DeepSpeed
    config with its own scheduler needs no scheduler.pt, each process of a multi-process run has its RNG file; a
    missing RNG file alone only warns."""
    from swift_sophia.ms_swift.patches import resume_check
    from swift_sophia.ms_swift.patches.resume_check import check_resumable, missing_resume_state

    warnings = []
    monkeypatch.setattr(resume_check.logger, "warning", warnings.append)

    for name in ("trainer_state.json", "scheduler.pt", "rng_state_0.pth"):
        (tmp_path / name).write_text("x")
    (tmp_path / "global_step8").mkdir()
    assert missing_resume_state(str(tmp_path), deepspeed=True, world_size=2, process_index=0) == ([], None)
    (tmp_path / "scheduler.pt").unlink()
    assert missing_resume_state(str(tmp_path), deepspeed=True, deepspeed_scheduler=True, world_size=2) == ([], None)
    missing, rng = missing_resume_state(str(tmp_path), deepspeed=True, world_size=2, process_index=1)
    assert missing == ["learning-rate scheduler state (scheduler.pt)"] and rng == "RNG state (rng_state_1.pth)"
    missing, _ = missing_resume_state(str(tmp_path), world_size=2)  # without DeepSpeed: optimizer.pt
    assert "optimizer state (optimizer.pt)" in missing
    (tmp_path / "optimizer.pt").write_text("x")
    (tmp_path / "scheduler.pt").write_text("x")
    check_resumable(str(tmp_path), world_size=2, process_index=1)  # does not raise
    assert len(warnings) == 1 and f"{tmp_path} has no RNG state (rng_state_1.pth)" in warnings[0], warnings
    (tmp_path / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match=r"lacks the trainer state \(trainer_state.json"):
        check_resumable(str(tmp_path), world_size=2)
