"""Evaluation: benchmark converters on tiny fixtures in each benchmark's published layout, and `swift eval` on the
tiny default through EvalScope's native backend (a random-weights model: the answers are meaningless, the test is
that every question is asked and scored, in the benchmark's own breakdown)."""
import json
import os
import random
import subprocess
import sys

import pandas as pd
import pytest

from deploy_process import free_port
from swift_cli import SWIFT, env
from swift_sophia.evaluation.benchmarks import BENCHMARKS, converter
from swift_sophia.evaluation.breakdown import breakdown
from swift_sophia.evaluation.report import latest_run, overall, predictions, subset_scores
from swift_sophia.evaluation.vmcq import SetError
from swift_sophia.ms_swift.plugin_path import plugin_path
from swift_sophia.video.synthetic_clips import random_clip_spec, render_clip, write_mp4

SOPHIA = [sys.executable, "-m", "swift_sophia"]


def _clip(path, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = random.Random(seed)
    write_mp4(path, render_clip(random_clip_spec(rng, 2), 3, size=56, seed=seed))
    return path


# ------------------------------------------------------------------------------------ fixtures, published layouts
def videomme(root):
    """videomme/test-00000-of-00001.parquet + data/<videoID>.mp4 (one .MP4, as some archives extract)."""
    rows = []
    for i, duration in enumerate(["short", "short", "medium", "medium", "long", "long"]):
        vid = f"vid{i // 2}{duration[0]}"
        rows.append({"video_id": f"{i // 2 + 1:03d}", "duration": duration, "domain": "Knowledge",
                     "sub_category": "Astronomy", "url": "https://example.invalid", "videoID": vid,
                     "question_id": f"{i // 2 + 1:03d}-{i % 2 + 1}", "task_type": "Counting Problem",
                     "question": f"How many shots are in video {i}?",
                     "options": ["A. one", "B. two", "C. three", "D. four"], "answer": "ABCD"[i % 4]})
        _clip(os.path.join(root, "data", vid + (".MP4" if duration == "long" else ".mp4")), i)
    os.makedirs(os.path.join(root, "videomme"))
    pd.DataFrame(rows).to_parquet(os.path.join(root, "videomme", "test-00000-of-00001.parquet"))
    return rows


def mlvu(root):
    """MLVU/json/<n>_<task>.json + MLVU/video/<n>_<task>/<video>; 8_sub_scene is open-ended."""
    base = os.path.join(root, "MLVU")
    tasks = [("1_plotQA", "plotQA"), ("2_needle", "findNeedle"), ("4_count", "count")]
    for k, (stem, task) in enumerate(tasks):
        rows = []
        for i in range(2):
            name = f"{task}_{i}.mp4"
            _clip(os.path.join(base, "video", stem, name), 10 * k + i)
            rows.append({"video": name, "duration": 3.0, "question": f"{task} question {i}?",
                         "candidates": ["red", "green", "blue", "white"], "answer": ["green", "white"][i],
                         "question_type": task})
        os.makedirs(os.path.join(base, "json"), exist_ok=True)
        with open(os.path.join(base, "json", stem + ".json"), "w") as f:
            json.dump(rows, f)
    with open(os.path.join(base, "json", "8_sub_scene.json"), "w") as f:
        json.dump([{"video": "s.mp4", "duration": 9.0, "question": "Describe.", "answer": "...",
                    "question_type": "subPlot"}], f)


def longvideobench(root):
    rows = []
    for i, group in enumerate([15, 15, 600]):
        rel = f"lvb{i}.mp4"
        _clip(os.path.join(root, "videos", rel), 20 + i)
        rows.append({"video_id": f"v{i}", "question": f"What happens {i}?", "question_wo_referring_query": "",
                     "candidates": ["a", "b", "c", "d", "e"][: 4 + i % 2], "correct_choice": i % 4, "position": [],
                     "topic_category": "NP-News-Programs", "question_category": "S2E", "level": "L1-Perception",
                     "id": f"lvb_{i}", "video_path": rel, "subtitle_path": f"v{i}_en.json", "duration_group": group,
                     "starting_timestamp_for_subtitles": 0, "duration": 3.0, "view_count": 1})
    with open(os.path.join(root, "lvb_val.json"), "w") as f:
        json.dump(rows, f)


def egoschema(root):
    uids = ["001934bb-81bd-4cd8-a574-0472ef3f6678", "001d2d1b-d2f9-4c39-810e-6e2087ff9d5a", "0074f737-11cb-497d"]
    questions = [{"q_uid": u, "google_drive_id": "x", "question": f"What is c doing {i}?",
                  **{f"option {j}": f"option text {j}" for j in range(5)}} for i, u in enumerate(uids)]
    for i, u in enumerate(uids):
        _clip(os.path.join(root, "videos", u + ".mp4"), 30 + i)
    with open(os.path.join(root, "questions.json"), "w") as f:
        json.dump(questions, f)
    with open(os.path.join(root, "subset_answers.json"), "w") as f:
        json.dump({uids[0]: 3, uids[2]: 0}, f)  # the second question has no public answer


def lvbench(root):
    """data/video_info.meta.jsonl; one video as <key>.mp4, two in video2dataset's layout (00000/00000001.mp4 with
    its .json naming the url; 00000/00000002.mp4 named only in the shard's 00000.parquet)."""
    metas = []
    for k, key in enumerate(["KeyOne_abc", "KeyTwo-xyz", "Key3"]):
        qa = [{"uid": 100 * k + i, "question": f"What is shown {i}?\n(A) cat\n(B) dog\n(C) bird\n(D) fish",
               "answer": "ABCD"[(k + i) % 4], "question_type": ["entity recognition", "reasoning"][: 1 + i],
               "time_reference": "00:01-00:02"} for i in range(2)]
        metas.append({"key": key, "type": "documentary", "video_info": {"duration_minutes": 1.0}, "qa": qa})
    _clip(os.path.join(root, "videos", "KeyOne_abc.mp4"), 40)
    _clip(os.path.join(root, "videos", "00000", "00000001.mp4"), 41)
    with open(os.path.join(root, "videos", "00000", "00000001.json"), "w") as f:
        json.dump({"url": "https://www.youtube.com/watch?v=KeyTwo-xyz", "key": "00000001", "status": "success"}, f)
    _clip(os.path.join(root, "videos", "00000", "00000002.mp4"), 42)
    pd.DataFrame({"key": ["00000001", "00000002"], "status": ["success"] * 2,
                  "url": ["https://www.youtube.com/watch?v=KeyTwo-xyz", "https://www.youtube.com/watch?v=Key3"]}
                 ).to_parquet(os.path.join(root, "videos", "00000.parquet"))
    os.makedirs(os.path.join(root, "data"))
    with open(os.path.join(root, "data", "video_info.meta.jsonl"), "w") as f:
        f.write("".join(json.dumps(m) + "\n" for m in metas))


FIXTURES = {"videomme": videomme, "mlvu": mlvu, "longvideobench": longvideobench, "egoschema": egoschema,
            "lvbench": lvbench}


def _rows(out, subset):
    with open(os.path.join(out, f"{subset}_val.jsonl")) as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------ converters
def test_every_benchmark_has_a_fixture():
    assert set(FIXTURES) == set(BENCHMARKS)


EXPECTED = {  # subset: [(id, answer, options)] in file order
    "videomme": {"short": [("001-1", "A", ["one", "two", "three", "four"]), ("001-2", "B", None)],
                 "medium": [("002-1", "C", None), ("002-2", "D", None)],
                 "long": [("003-1", "A", None), ("003-2", "B", None)]},
    "mlvu": {"plotQA": [("1_plotQA/0", "B", ["red", "green", "blue", "white"]), ("1_plotQA/1", "D", None)],
             "findNeedle": [("2_needle/0", "B", None), ("2_needle/1", "D", None)],
             "count": [("4_count/0", "B", None), ("4_count/1", "D", None)]},
    "longvideobench": {"duration_15": [("lvb_0", "A", ["a", "b", "c", "d"]), ("lvb_1", "B", ["a", "b", "c", "d", "e"])],
                       "duration_600": [("lvb_2", "C", None)]},
    "egoschema": {"subset": [("001934bb-81bd-4cd8-a574-0472ef3f6678", "D", [f"option text {j}" for j in range(5)]),
                             ("0074f737-11cb-497d", "A", None)]},
    "lvbench": {"all": [("0", "A", ["cat", "dog", "bird", "fish"]), ("1", "B", None), ("100", "B", None),
                        ("101", "C", None), ("200", "C", None), ("201", "D", None)]},
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_converter_reads_the_published_layout(name, tmp_path):
    root, out = tmp_path / "published", tmp_path / "set"
    FIXTURES[name](str(root))
    summary = converter(name)(str(root), str(out))
    expected = EXPECTED[name]
    assert list(summary["subsets"]) == list(expected)
    assert summary["subsets"] == {s: len(v) for s, v in expected.items()}
    args = json.load(open(out / "eval_dataset_args.json"))["general_vmcq"]
    assert args["local_path"] == str(out) and args["subset_list"] == list(expected)
    for subset, questions in expected.items():
        rows = _rows(out, subset)
        assert [(r["id"], r["answer"]) for r in rows] == [(q, a) for q, a, _ in questions]
        for row, (_, _, options) in zip(rows, questions):
            assert row["question"].startswith("<video 1>\n")
            assert os.path.isabs(row["video_1"]) and os.path.isfile(row["video_1"])
            if options is not None:
                assert row["options"] == options
    if name == "mlvu":
        assert summary["left_out_tasks"] == ["8_sub_scene"]
    if name == "lvbench":  # the video2dataset files were found through the sidecar's and the parquet's urls
        assert _rows(out, "all")[2]["video_1"].endswith(os.path.join("00000", "00000001.mp4"))
        assert _rows(out, "all")[4]["video_1"].endswith(os.path.join("00000", "00000002.mp4"))
        assert _rows(out, "all")[1]["question_type"] == ["entity recognition", "reasoning"]


def test_missing_video_names_the_question_and_the_path(tmp_path):
    root = tmp_path / "published"
    videomme(str(root))
    os.remove(root / "data" / "vid1m.mp4")
    with pytest.raises(SetError) as err:
        converter("videomme")(str(root), str(tmp_path / "set"))
    assert "002-1" in str(err.value) and str(root / "data" / "vid1m.mp4") in str(err.value)
    # the CLI says the same and exits 1; with skip_missing the two questions of that video are left out, listed
    proc = subprocess.run([*SOPHIA, "convert-benchmark", "videomme", str(root), str(tmp_path / "set")],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 1 and "002-1" in proc.stdout and "vid1m.mp4" in proc.stdout
    summary = converter("videomme")(str(root), str(tmp_path / "set"), skip_missing=True)
    assert summary["subsets"] == {"short": 2, "long": 2}
    assert json.load(open(tmp_path / "set" / "set.json")) == summary
    assert sorted(s["id"] for s in summary["skipped"]) == ["002-1", "002-2"]


def test_unreadable_video_and_bad_answer_are_named(tmp_path):
    root = tmp_path / "published"
    egoschema(str(root))
    uid = "0074f737-11cb-497d"
    (root / "videos" / f"{uid}.mp4").write_text("not a video")
    with pytest.raises(SetError, match=f"{uid}.*cannot open video .*{uid}.mp4"):
        converter("egoschema")(str(root), str(tmp_path / "set"))
    root2 = tmp_path / "mlvu"
    mlvu(str(root2))
    path = root2 / "MLVU" / "json" / "2_needle.json"
    rows = json.load(open(path))
    rows[1]["answer"] = "purple"
    json.dump(rows, open(path, "w"))
    with pytest.raises(SetError, match=r"question 2_needle/1: answer 'purple' is neither"):
        converter("mlvu")(str(root2), str(tmp_path / "set2"))


# ------------------------------------------------------------------------------------------------ swift eval
def _swift_eval(model, set_dir, out):
    cmd = [SWIFT, "eval", "--model", model, "--eval_backend", "Native", "--eval_dataset", "general_vmcq",
           "--eval_dataset_args", os.path.join(set_dir, "eval_dataset_args.json"), "--eval_output_dir", out,
           "--model_type", "sophia", "--external_plugins", plugin_path(),
           "--infer_backend", "transformers", "--max_new_tokens", "4", "--eval_num_proc", "2",
           "--port", str(free_port()),  # the server it starts listens on 127.0.0.1, not ms-swift's 0.0.0.0
           "--eval_generation_config", json.dumps({"retries": 1})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(VIDEO_SEGMENTS="4"), timeout=420,
                          cwd=os.path.dirname(os.path.abspath(out)))  # swift eval writes result/ in cwd
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return latest_run(out)


@pytest.mark.slow
def test_swift_eval_scores_every_question_in_the_benchmark_breakdown(tiny_model_dir, tmp_path):
    """Video-MME's set through `swift eval`: short / medium / long scored (the other benchmarks' sets differ only in
    their subset files, checked above)."""
    name = "videomme"
    root, set_dir = tmp_path / "published", tmp_path / "set"
    FIXTURES[name](str(root))
    proc = subprocess.run([*SOPHIA, "convert-benchmark", name, str(root), str(set_dir)], capture_output=True,
                          text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"--eval_dataset_args {set_dir / 'eval_dataset_args.json'}" in proc.stdout  # the command to run
    run = _swift_eval(tiny_model_dir, str(set_dir), str(tmp_path / "eval"))
    expected = EXPECTED[name]
    scores = subset_scores(run)
    assert set(scores) == set(expected)
    for subset, questions in expected.items():
        assert scores[subset]["num"] == len(questions)
        assert 0.0 <= scores[subset]["score"] <= 1.0
        rows = predictions(run, subset)
        assert sorted(r["index"] for r in rows) == list(range(len(questions)))
        for r in rows:
            assert r["model_output"]["error"] is None and r["model_output"]["choices"][0]["message"]["content"]
            # the server read the 4 sampled frames of the video: 4 frames x 4 tokens in the prompt
            assert r["model_output"]["usage"]["input_tokens"] > 16
    assert overall(run)["num"] == sum(len(q) for q in expected.values())
    # Video-MME's other categories, joined from EvalScope's reviews with the set's rows
    result = breakdown(str(set_dir), str(tmp_path / "eval"))
    assert result["scored"] == 6 and result["unscored"] == []
    assert abs(result["accuracy"] - overall(run)["score"]) < 1e-6
    assert {k: v["num"] for k, v in result["by"]["duration"].items()} == {"long": 2, "medium": 2, "short": 2}
    assert {k: v["num"] for k, v in result["by"]["task_type"].items()} == {"Counting Problem": 6}
    assert os.path.isfile(os.path.join(run, "breakdown.json"))


def test_breakdown_counts_overlapping_categories_and_unscored_questions(tmp_path):
    """LVBench's categories are labels a question can have several of; a question with no review is named."""
    root, set_dir = tmp_path / "published", tmp_path / "set"
    lvbench(str(root))
    converter("lvbench")(str(root), str(set_dir))
    reviews = tmp_path / "eval" / "native" / "20260101_000000" / "reviews" / "m"
    reviews.mkdir(parents=True)
    (reviews.parent.parent / "reports").mkdir()
    scored = {0: 1.0, 1: 0.0, 3: 1.0, 4: 0.0, 5: 1.0}  # the third question (uid 100) was not scored
    reviews.joinpath("general_vmcq_all.jsonl").write_text("".join(
        json.dumps({"index": i, "sample_score": {"score": {"value": {"acc": a}}}}) + "\n" for i, a in scored.items()))
    result = breakdown(str(set_dir), str(tmp_path / "eval"))
    assert result["unscored"] == ["100"] and result["scored"] == 5
    # entity recognition: uids 0, 1, 101, 200, 201 -> 1, 0, 1, 0, 1; reasoning: uids 1, 101, 201 -> 0, 1, 1
    assert result["by"]["question_type"] == {"entity recognition": {"accuracy": 3 / 5, "num": 5},
                                             "reasoning": {"accuracy": 2 / 3, "num": 3}}


def test_local_server_gets_video_paths_remote_gets_data_urls(tmp_path):
    """The patch (swift_sophia/ms_swift/patches/swift_eval.py): no base64 copy of a local video for a server on this
    machine."""
    from evalscope.api.messages import ContentVideo
    from evalscope.models.utils import openai as es_openai

    from swift_sophia.ms_swift.patches import swift_eval

    swift_eval.apply()

    video = _clip(str(tmp_path / "v.mp4"), 0)
    part = es_openai.openai_chat_completion_part(ContentVideo(video=video, format="mp4"),
                                                 base_url="http://127.0.0.1:8000/v1")
    assert part == {"type": "video", "video": video}
    part = es_openai.openai_chat_completion_part(ContentVideo(video=video, format="mp4"),
                                                 base_url="https://api.example.com/v1")
    assert part["type"] == "video_url" and part["video_url"]["url"].startswith("data:video/mp4;base64,")
