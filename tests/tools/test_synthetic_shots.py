"""The one-shot-among-many generator (swift_sophia.tools.synthetic_shots): exactly one shot shows the named shape, the
answer is that shot's background, counts are right, the training prompt is the evaluation's prompt."""
import json
import os
import random

import av
import numpy as np
import pytest

from swift_sophia.tools.synthetic_shots import (
    SHAPE_COLOR,
    answer_seen,
    make_dataset,
    random_video_spec,
    render_video,
    uniform_frames,
    user_text,
)
from swift_sophia.video.synthetic_clips import COLORS, SHAPES


def _frames(path):
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def _black(frame):
    """Fraction of near-black pixels (the shape; no colour of COLORS is dark)."""
    return (frame.astype(int).max(axis=2) < 60).mean()


def _nearest_colour(rgb):
    return min(COLORS, key=lambda c: np.abs(np.array(COLORS[c]) - rgb).sum())


@pytest.mark.parametrize("seed", range(5))
def test_spec_has_exactly_one_shape_shot(seed):
    spec = random_video_spec(random.Random(seed), num_shots=12)
    shots = spec["shots"]
    assert len(shots) == 12
    assert [i for i, s in enumerate(shots) if s["shape"]] == [spec["answer_shot"]]
    assert spec["shape"] in SHAPES and shots[spec["answer_shot"]]["shape"] == spec["shape"]
    assert spec["answer"] == shots[spec["answer_shot"]]["background"]
    assert all(a["background"] != b["background"] for a, b in zip(shots, shots[1:]))
    assert shots[spec["answer_shot"]]["stripe"] is None


def test_rendered_shape_only_in_its_shot():
    spec = random_video_spec(random.Random(3), num_shots=10)
    frames = render_video(spec, 3, size=56, seed=1)
    assert frames.shape == (30, 56, 56, 3) and frames.dtype == np.uint8
    black = [_black(f) > 0.03 for f in frames]
    a = spec["answer_shot"]
    assert black == [a * 3 <= i < (a + 1) * 3 for i in range(30)]
    # the background of the shape shot (a corner pixel, away from the shape) is the answer's colour
    for f in frames[a * 3:(a + 1) * 3]:
        assert _nearest_colour(f[:4, :4].reshape(-1, 3).mean(0)) == spec["answer"]
    assert tuple(SHAPE_COLOR) not in COLORS.values()


def test_dataset_rows_videos_and_eval_set(tmp_path):
    m = make_dataset(str(tmp_path), num_train=3, num_val=2, num_shots=8, frames_per_shot=2, seed=7)
    assert m["frames"] == 16
    train = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    val = [json.loads(line) for line in open(tmp_path / "val.jsonl")]
    assert len(train) == 3 and len(val) == 2 and len(m["videos"]) == 5
    for row in train + val:
        video = row["videos"][0]
        info = m["videos"][video]
        user, reply = row["messages"][0]["content"], row["messages"][1]["content"]
        assert user.count("<video>") == 1
        assert f"shows a {info['shape']}?" in user  # the question names the shape
        assert reply == f"ANSWER: {info['letter']}"
        assert info["options"][ord(info["letter"]) - 65] == info["answer"]
        assert f"{info['letter']}) {info['answer']}" in user
        assert info["options"] == list(COLORS)  # every colour, in a fixed order
        frames = _frames(video)
        assert len(frames) == 16  # 8 shots x 2 frames
        start, end = info["answer_frames"]
        assert end - start == 2
        assert [i for i in range(16) if _black(frames[i]) > 0.03] == list(range(start, end))
    # the general_vmcq set: the val videos, same answers
    rows = [json.loads(line) for line in open(tmp_path / "eval_set" / "default_val.jsonl")]
    args = json.load(open(tmp_path / "eval_set" / "eval_dataset_args.json"))["general_vmcq"]
    assert args["subset_list"] == ["default"]
    assert [r["video_1"] for r in rows] == [r["videos"][0] for r in val]
    for r, v in zip(rows, val):
        info = m["videos"][r["video_1"]]
        assert r["answer"] == info["letter"] and r["options"] == info["options"]
        assert r["question"] == "<video 1>\n" + info["question"]
        # the training prompt is the text EvalScope builds from this row, <video> where the video goes
        assert user_text(info["question"], r["options"]) == v["messages"][0]["content"]


def test_shuffled_options(tmp_path):
    m = make_dataset(str(tmp_path), num_train=0, num_val=3, num_shots=4, frames_per_shot=1, seed=1, num_options=4)
    for info in m["videos"].values():
        assert len(set(info["options"])) == 4 and info["answer"] in info["options"]
        assert info["options"][ord(info["letter"]) - 65] == info["answer"]


def test_uniform_frames_can_miss_the_answer_shot():
    frames = uniform_frames(32, 11)
    assert len(frames) == 11
    missed = [s for s in range(16) if not answer_seen(frames, [2 * s, 2 * s + 2])]
    assert 0 < len(missed) < 16  # some 2-frame shots fall between the samples, as the study relies on
    assert all(answer_seen(list(range(32)), [2 * s, 2 * s + 2]) for s in range(16))


def test_user_text_without_evalscope_is_evalscopes_text(monkeypatch):
    import sys

    options = ["red", "green", "blue", "yellow"]
    with_evalscope = user_text("What color?", options)
    monkeypatch.setitem(sys.modules, "evalscope.utils.multi_choices", None)  # import fails as on a training box
    assert user_text("What color?", options) == with_evalscope


def test_balanced_answers_baselines_avi_and_relocation(tmp_path):
    import shutil
    from collections import Counter

    import decord

    from swift_sophia.tools.synthetic_shots import relocate

    src = tmp_path / "written"
    m = make_dataset(str(src), num_train=12, num_val=6, num_shots=3, frames_per_shot=2, size=28, noise=0,
                     stripe_rate=0, balance=True, container="avi")
    answers = Counter((v["split"], v["answer"]) for v in m["videos"].values())
    assert set(answers.values()) == {2, 1} and sum(answers.values()) == 18  # 12 train: 2 each; 6 val: 1 each
    for video, info in m["videos"].items():
        shots = info["shots"]
        assert all(a["background"] != b["background"] for a, b in zip(shots, shots[1:]))
        assert shots[info["answer_shot"]]["background"] == info["answer"]
        frames = decord.VideoReader(video).get_batch(list(range(6))).asnumpy()
        expected = render_video(info, 2, size=28, seed=0, noise=0)
        assert np.array_equal(frames[::2, 0, 0], expected[::2, 0, 0])  # a corner: the backgrounds, exact
    assert len(decord.VideoReader(m["blank_video"])) == 6
    val = [json.loads(line) for line in open(src / "val.jsonl")]
    text = [json.loads(line) for line in open(src / "val_text_only.jsonl")]
    blank = [json.loads(line) for line in open(src / "val_blank.jsonl")]
    for v, t, b in zip(val, text, blank):
        assert "videos" not in t and "<video>" not in t["messages"][0]["content"]
        assert v["messages"][0]["content"].replace("<video>\n", "") == t["messages"][0]["content"]
        assert b["videos"] == [m["blank_video"]] and b["messages"] == v["messages"]
        assert t["messages"][1] == v["messages"][1]
    moved = tmp_path / "moved"
    shutil.move(str(src), str(moved))
    assert relocate(str(moved)) > 0
    rows = [json.loads(line) for line in open(moved / "val_blank.jsonl")] + [
        json.loads(line) for line in open(moved / "train.jsonl")]
    assert all(os.path.exists(r["videos"][0]) and r["videos"][0].startswith(str(moved)) for r in rows)
    assert relocate(str(moved)) == 0


def test_training_videos_of_several_lengths(tmp_path):
    """--min-shots: training videos of min_shots to num_shots shots (the decoder sees several lengths), held-out ones
    of num_shots; the true shots cached for each video cover its own frames."""
    import decord

    from swift_sophia.tools.synthetic_shots import cache_true_shots
    from swift_sophia.video.shot_cache import ShotCache, content_hash
    from swift_sophia.video.shots import DetectionSettings, shot_cache_key

    m = make_dataset(str(tmp_path / "d"), num_train=16, num_val=4, num_shots=5, frames_per_shot=2, size=28, noise=0,
                     stripe_rate=0, container="avi", min_shots=2)
    lengths = {info["split"]: set() for info in m["videos"].values()}
    for video, info in m["videos"].items():
        frames = len(decord.VideoReader(video))
        assert frames == 2 * len(info["shots"]) and info["answer_frames"][1] <= frames
        lengths[info["split"]].add(frames)
    assert lengths["val"] == {10} and len(lengths["train"]) > 1 and lengths["train"] <= {4, 6, 8, 10}
    cache_true_shots(m, str(tmp_path / "cache"))
    store, settings = ShotCache(str(tmp_path / "cache")), DetectionSettings.from_env()
    for video, info in m["videos"].items():
        entry = store.get(shot_cache_key(content_hash(video), settings))
        assert entry["total_frames"] == 2 * len(info["shots"]) and len(entry["cuts"]) == len(info["shots"]) - 1
    with pytest.raises(ValueError, match="min_shots must be between 2 and num_shots"):
        make_dataset(str(tmp_path / "e"), num_train=1, num_val=1, num_shots=3, min_shots=4)


def test_niah_inputs_haystack_needles_and_training_prompt(tmp_path):
    """`--niah-inputs`: a haystack of distractor shots only, one answer-shot clip per (colour, shape) with the training
    rows' question and options, read by niah's loaders; any six needles in a row ask every colour once."""
    from collections import Counter

    from swift_sophia.evaluation.niah_set import build_cells, load_needles
    from swift_sophia.tools.synthetic_shots import QUESTION, main
    from swift_sophia.video.frames import load_video

    out = tmp_path / "niah_inputs"
    assert main([str(out), "--niah-inputs", "--num-shots", "6", "--frames-per-shot", "3", "--size", "32",
                 "--container", "avi", "--seed", "4"]) == 0
    with pytest.raises(SystemExit):  # it writes no dataset: nothing to relocate or cache
        main([str(out), "--niah-inputs", "--relocate"])
    haystack = load_video(str(out / "haystack.avi"), 100).frames
    assert len(haystack) == 18 and max(_black(f) for f in haystack) < 0.01  # 6 shots x 3 frames, no shape
    corners = [_nearest_colour(f[:4, :4].reshape(-1, 3).mean(0)) for f in haystack[::3]]
    assert all(a != b for a, b in zip(corners, corners[1:]))  # hard cuts between shots, as in training

    lines = [json.loads(line) for line in open(out / "needles.jsonl")]
    needles = load_needles(str(out / "needles.jsonl"), 32)  # the clips as sophia niah reads them
    assert sorted((n["answer"], n["question"]) for n in lines) == sorted(
        (c, QUESTION.format(shape=s)) for c in COLORS for s in SHAPES)
    for i in range(len(lines)):  # --samples 6: every cell asks every colour, and every shape twice
        window = [lines[(i + j) % len(lines)] for j in range(len(COLORS))]
        assert {n["answer"] for n in window} == set(COLORS)
        if i % len(COLORS) == 0:
            assert set(Counter(n["question"] for n in window).values()) == {2}
    for line, needle in zip(lines, needles):
        assert line["options"] == list(COLORS) and needle.options == list(COLORS)
        assert needle.options[ord(needle.answer) - 65] == line["answer"]
        assert len(needle.frames) == 3 and all(_black(f) > 0.03 for f in needle.frames)
        assert all(_nearest_colour(f[:4, :4].reshape(-1, 3).mean(0)) == line["answer"] for f in needle.frames)

    # the NIAH rows ask exactly what the training rows ask
    m = make_dataset(str(tmp_path / "train"), num_train=12, num_val=0, num_shots=2, frames_per_shot=1, size=16,
                     container="avi")
    trained = {}  # shape -> the user turn of a training row
    for row in map(json.loads, open(tmp_path / "train" / "train.jsonl")):
        trained[m["videos"][row["videos"][0]]["shape"]] = row["messages"][0]["content"]
    assert set(trained) == set(SHAPES)
    questions = build_cells(str(tmp_path / "set"), frames=[12], depths=[50], size=32,
                            haystack=str(out / "haystack.avi"), needles=needles, samples=6)
    assert sorted(q.answer for q in questions) == list("ABCDEF")
    for q in questions:
        row = q.row()
        shape = row["question"].rsplit(" ", 1)[1].rstrip("?")
        assert user_text(row["question"].removeprefix("<video 1>\n"), row["options"]) == trained[shape]
        frames = _frames(q.video)
        at = round(0.5 * (12 - 3))  # the 3-frame needle at 50 % of the cell
        assert [i for i in range(12) if _black(frames[i]) > 0.03] == [at, at + 1, at + 2]
        assert _nearest_colour(frames[at][:4, :4].reshape(-1, 3).mean(0)) == q.options[ord(q.answer) - 65]
