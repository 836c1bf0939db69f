"""examples/miniature_study.sh end to end at toy size on the CPU: every stage, every condition and both baselines
evaluated, the frame analysis, the NIAH heatmap of the task's own needles and the table (accuracy and Wilson
interval of every condition)."""
import json
import os
import subprocess

import pytest

from swift_cli import env
from swift_sophia.tools.study_report import CONDITIONS

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMES, SHOTS, NUM_VAL = 8, 4, 6
K, BUDGET = 3, 2  # 30/30 keeps 3 of 4 shots and 1 of each shot's 2 frames


def test_miniature_study_reports_every_condition(tmp_path):
    work = tmp_path / "study"
    sizes = dict(NUM_TRAIN="16", NUM_VAL=str(NUM_VAL), FRAMES=str(FRAMES), SHOTS=str(SHOTS), BATCH="8",
                 STAGE3_EPOCHS="1", BUDGET=str(BUDGET), EVAL_JOBS="2", CONTAINER="avi", BALANCE="1",
                 NIAH="1", NIAH_FRAMES="8,16", NIAH_SAMPLES="1")
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "miniature_study.sh"), str(work)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=env(**sizes))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    res = json.load(open(work / "results.json"))
    table = open(work / "table.md").read()
    assert set(res["conditions"]) == set(CONDITIONS)
    for name, entry in res["conditions"].items():
        assert entry["label"] in table, name
        assert entry["n"] == NUM_VAL and len(entry["scores"]) == NUM_VAL, name
        lo, hi = entry["ci95"]
        assert 0 <= lo <= entry["accuracy"] <= hi <= 1, (name, entry)
        assert f"{entry['accuracy']:.3f} ({entry['hits']}/{NUM_VAL})" in table
    frames = {name: (e.get("frames_min"), e.get("frames_max")) for name, e in res["conditions"].items()}
    assert frames["all_frames"] == frames["blank_video"] == (FRAMES, FRAMES)
    assert frames["uniform_K"] == frames["prune30"] == (K, K)  # true shots of equal length: exactly K
    assert frames["no_hierarchy"] == frames["neighbours_0"] == frames["prune30"]
    assert frames["uniform_B"] == (BUDGET, BUDGET) and 1 <= frames["budget"][0] <= frames["budget"][1] <= BUDGET
    assert frames["text_only"] == (None, None) and "answer_shot_shown" not in res["conditions"]["blank_video"]
    assert res["conditions"]["all_frames"]["answer_shot_shown"] == NUM_VAL
    # every evaluation could write a whole answer: `ANSWER: E` is 9 tokens of the study's tokenizer (8 cut it short)
    from swift_sophia.tools.study_report import answer_tokens

    needed = answer_tokens(str(work))
    assert needed >= 10
    for name in CONDITIONS:
        log = open(work / "eval" / f"{name}.log").read()
        assert f"max_new_tokens={needed}," in log, name
    for name in ("prune30", "budget"):
        for stage in ("before stage 3", "after stage 3"):
            assert 0 <= res["pruner"][f"{name}, {stage}"]["answer_shot_shown"] <= NUM_VAL
    assert set(res["training"]) == {"stage1", "stage2", "stage3"}
    # NIAH: every cell asked the task's question about one of its answer shots, hidden among its other shots
    niah = json.load(open(work / "niah" / "niah_results.json"))
    assert niah["needle"].endswith("needles.jsonl") and niah["haystack"].endswith("haystack.mp4")
    assert [(c["frames"], c["depth"]) for c in res["niah"]] == [(n, d) for n in (8, 16) for d in (0, 25, 50, 75, 100)]
    assert all(c["answered"] == 1 and 0 <= c["accuracy"] <= 1 for c in res["niah"])
    rows = [json.loads(line) for path in (work / "niah" / "set").glob("*.jsonl") for line in open(path)]
    assert len(rows) == 10 and all("What color is the background of the shot" in r["question"] for r in rows)
    assert (work / "niah" / "niah_heatmap.png").stat().st_size > 0
    timings = open(work / "timings.txt").read()
    assert "stage 3" in timings and "done" in timings


def test_the_study_stops_after_stage_2_and_goes_on_with_it(tmp_path):
    """A study in pieces (jobs with a time limit): UNTIL_STAGE=2 stops after stage 2, and
    FROM_STAGE=2 RESUME=1 goes on with stage 2 from its last checkpoint (its optimizer and schedule restored), not
    from step 1."""
    work = tmp_path / "study"
    sizes = dict(NUM_TRAIN="16", NUM_VAL="2", FRAMES=str(FRAMES), SHOTS=str(SHOTS), BATCH="8", CONTAINER="avi",
                 BALANCE="1", SAVE_ONLY_MODEL="false", UNTIL_STAGE="2")
    script = ["bash", os.path.join(ROOT, "examples", "miniature_study.sh"), str(work)]

    def run(**more):
        proc = subprocess.run(script, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env(**sizes, **more))
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    def steps():
        lines = [json.loads(line) for line in open(work / "stage2" / "logging.jsonl")]
        return [r["global_step/max_steps"] for r in lines if "loss" in r]

    run(STAGE2_EPOCHS="1")  # 2 steps of 8 videos
    assert (work / "stage2" / "checkpoint-2").is_dir() and not (work / "stage3").exists()
    assert steps() == ["1/2"]
    run(STAGE2_EPOCHS="2", FROM_STAGE="2", RESUME="1")  # 4 steps in all: steps 3 and 4 run now
    assert (work / "stage2" / "checkpoint-4").is_dir() and not (work / "stage3").exists()
    assert steps() == ["1/2", "4/4"]  # a stage 2 started again would log its first step, 1/4
    assert "stage 2: going on from" in open(work / "timings.txt").read()
