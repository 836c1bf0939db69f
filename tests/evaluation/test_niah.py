"""Video needle-in-a-haystack: the set (needle at its depth, N frames per cell), the heatmap, and `sophia niah` on the
tiny default through `swift eval` (random weights: the accuracy is meaningless, every cell's pipeline is not)."""
import json
import os
import random
import shlex
import subprocess
import sys
from collections import Counter

import av
import numpy as np
import pytest
from PIL import Image

from deploy_process import free_port
from swift_cli import env
from swift_sophia.evaluation.heatmap import BEYOND_COLOR, draw
from swift_sophia.evaluation.niah_set import PATTERNS, build_cells, load_needle, load_needles, pattern_frame
from swift_sophia.evaluation.report import latest_run, predictions
from swift_sophia.evaluation.vmcq import SetError
from swift_sophia.video.synthetic_clips import random_clip_spec, render_clip, write_mp4


def _frames(path):
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def _grey(frames):
    """Indices of the black-and-white frames (the needle): grey everywhere and a good part black; the haystack's
    frames have no black (swift_sophia.video.synthetic_clips' colours)."""
    frames = frames.astype(int)
    spread = (frames.max(axis=3) - frames.min(axis=3)).mean(axis=(1, 2))
    dark = (frames.max(axis=3) < 60).mean(axis=(1, 2))
    return [i for i in range(len(frames)) if spread[i] < 20 and dark[i] > 0.25]


@pytest.mark.parametrize("n", [10, 33])
def test_generated_needle_sits_at_its_depth(n, tmp_path):
    depths = [0, 25, 50, 75, 100]
    questions = build_cells(str(tmp_path), frames=[n], depths=depths, size=48, samples=2, seed=3)
    assert [q.subset for q in questions] == [f"frames{n}_depth{d}" for d in depths for _ in range(2)]
    for q in questions:
        frames = _frames(q.video)
        assert len(frames) == n
        d = int(q.subset.split("depth")[1])
        assert _grey(frames) == [round(d / 100 * (n - 1))], (q.subset, _grey(frames))
        # the question's answer is the pattern drawn in that frame
        truth = q.options["ABCD".index(q.answer)]
        needle = frames[_grey(frames)[0]].astype(int)
        distance = {p: np.abs(needle - pattern_frame(p, 48)).mean() for p in PATTERNS}
        assert min(distance, key=distance.get) == truth, distance
        assert q.options == list(PATTERNS)


def test_given_haystack_and_needle_image(tmp_path):
    rng = random.Random(0)
    source = str(tmp_path / "film.mp4")
    write_mp4(source, render_clip(random_clip_spec(rng, 3), 5, size=64, seed=1))  # 15 frames
    image = tmp_path / "needle.png"
    Image.fromarray(pattern_frame("checkerboard", 80)).save(image)
    needle = load_needle(str(image), 48, 2, "Which pattern?", ["stripes", "checkerboard"], "checkerboard")
    assert needle.answer == "B" and len(needle.frames) == 2
    questions = build_cells(str(tmp_path / "set"), frames=[8, 40], depths=[50], size=48, haystack=source,
                            needles=[needle])
    for q, n in zip(questions, [8, 40]):
        frames = _frames(q.video)
        assert len(frames) == n  # 40 > the film's 15 frames: its frames repeat, in order
        at = round(0.5 * (n - 2))
        assert _grey(frames) == [at, at + 1]
        assert q.question == "Which pattern?" and q.answer == "B"
    with pytest.raises(ValueError, match="needle file not found: .*missing.png"):
        load_needle(str(tmp_path / "missing.png"), 48, 1, "q", ["a", "b"], "a")


def _pattern_needles(folder):
    """needles.jsonl with the four patterns as needles: images, and one 2-frame clip in a subfolder (paths relative
    to the file), each answered by its pattern (by text, or by letter)."""
    os.makedirs(folder / "clips")
    lines = []
    for i, name in enumerate(PATTERNS):
        if i == 3:
            path = "clips/rings.mp4"
            write_mp4(str(folder / path), np.repeat(pattern_frame(name, 64)[None], 6, axis=0))
        else:
            path = f"{i}.png"
            Image.fromarray(pattern_frame(name, 64)).save(folder / path)
        lines.append({"needle": path, "question": "Which pattern?", "options": list(PATTERNS),
                      "answer": "ABCD"[i] if i == 2 else name, **({"needle_frames": 2} if i == 3 else {})})
    (folder / "needles.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(folder / "needles.jsonl")


def _needle_pattern(frames):
    needle = frames[_grey(frames)[0]].astype(int)
    distance = {p: np.abs(needle - pattern_frame(p, 48)).mean() for p in PATTERNS}
    return min(distance, key=distance.get)


def test_needles_file_cycles_through_its_needles(tmp_path):
    """Sample s of cell c asks needle (c x samples + s) mod 4: each cell asks two different needles, the grid asks
    every needle (so every answer) equally often, and every video holds the needle its question asks about."""
    needles = load_needles(_pattern_needles(tmp_path / "in"), 48)
    assert [n.answer for n in needles] == ["A", "B", "C", "D"]
    assert [len(n.frames) for n in needles] == [1, 1, 1, 2]
    questions = build_cells(str(tmp_path / "set"), frames=[8, 12], depths=[0, 50, 100], size=48, needles=needles,
                            samples=2)
    assert [q.extra["needle"] for q in questions] == [0, 1, 2, 3] * 3
    assert Counter(q.answer for q in questions) == {"A": 3, "B": 3, "C": 3, "D": 3}
    for cell in {q.subset for q in questions}:
        assert len({q.answer for q in questions if q.subset == cell}) == 2
    for q in questions:
        frames = _frames(q.video)
        n, d = q.extra["frames"], q.extra["depth"]
        k = len(needles[q.extra["needle"]].frames)
        at = round(d / 100 * (n - k))
        assert len(frames) == n and _grey(frames) == list(range(at, at + k)), (q.qid, _grey(frames))
        assert _needle_pattern(frames) == q.options["ABCD".index(q.answer)]
    # a cell of as many samples as needles asks every needle once
    questions = build_cells(str(tmp_path / "set4"), frames=[8], depths=[50], size=48, needles=needles, samples=4)
    assert sorted(q.answer for q in questions) == ["A", "B", "C", "D"]


GOOD_NEEDLE = {"needle": "ok.png", "question": "Which pattern?", "options": ["checkerboard", "stripes"],
               "answer": "checkerboard"}


@pytest.mark.parametrize("second_line, message", [
    ('{"needle": "ok.png", "question": ', r"needles\.jsonl line 2: not valid JSON"),
    (json.dumps({"needle": "ok.png", "question": "Which?"}), r"needles\.jsonl line 2: missing key options, answer"),
    (json.dumps(dict(GOOD_NEEDLE, needle="gone.png")), r"needles\.jsonl line 2: needle file not found: .*gone\.png"),
    (json.dumps(dict(GOOD_NEEDLE, answer="rings")),
     r"needles\.jsonl line 2: answer 'rings' is neither a letter nor one of the options \['checkerboard', 'stripes'\]"),
], ids=["bad json", "missing keys", "needle not found", "answer not an option"])
def test_needles_file_errors_name_the_line(second_line, message, tmp_path):
    Image.fromarray(pattern_frame("checkerboard", 32)).save(tmp_path / "ok.png")
    path = tmp_path / "needles.jsonl"
    path.write_text(json.dumps(GOOD_NEEDLE) + "\n" + second_line + "\n")
    with pytest.raises(SetError, match=message):
        load_needles(str(path), 32)


def test_missing_needles_file_is_named(tmp_path):
    with pytest.raises(SetError, match=r"needles file not found: .*absent\.jsonl"):
        load_needles(str(tmp_path / "absent.jsonl"), 32)


def test_needles_excludes_the_single_needle_flags(tmp_path):
    from swift_sophia.evaluation import niah

    base = ["--model", str(tmp_path / "never-loaded"), "--output-dir", str(tmp_path / "out"), "--needles", "n.jsonl"]
    with pytest.raises(SystemExit, match="--needles cannot go with --needle, --answer"):
        niah.main(base + ["--needle", "cat.png", "--answer", "cat"])
    with pytest.raises(SystemExit, match="--needles cannot go with --question, --option"):
        niah.main(base + ["--question", "Which?", "--option", "a", "--option", "b"])
    # one needle has one question: asking it twice per cell measures nothing more
    Image.fromarray(pattern_frame("checkerboard", 32)).save(tmp_path / "needle.png")
    needle = load_needle(str(tmp_path / "needle.png"), 32, 1, "Which?", ["a", "b"], "a")
    with pytest.raises(SetError, match="--samples > 1 needs several needles"):
        build_cells(str(tmp_path / "set"), frames=[8], depths=[50], size=32, needles=[needle], samples=2)


def test_sophia_niah_builds_a_set_from_a_needles_file(tiny_model_dir, tmp_path):
    source = str(tmp_path / "film.mp4")
    write_mp4(source, render_clip(random_clip_spec(random.Random(2), 3), 8, size=56, seed=1))  # 24 frames
    needles = _pattern_needles(tmp_path / "in")
    out = tmp_path / "niah"
    proc = subprocess.run([sys.executable, "-m", "swift_sophia", "niah", "--model", tiny_model_dir, "--output-dir",
                           str(out), "--frames", "8,16", "--depths", "0,100", "--haystack", source, "--needles",
                           needles, "--samples", "2", "--skip-eval"],
                          capture_output=True, text=True, timeout=300, env=env(), cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["needle"] == needles and manifest["num_needles"] == 4 and manifest["samples"] == 2
    rows = {c["cell"]: [json.loads(line) for line in open(out / "set" / f"{c['cell']}_val.jsonl")]
            for c in manifest["cells"]}
    assert list(rows) == ["frames8_depth0", "frames8_depth100", "frames16_depth0", "frames16_depth100"]
    assert [r["needle"] for cell in rows.values() for r in cell] == [0, 1, 2, 3] * 2
    assert [r["answer"] for cell in rows.values() for r in cell] == ["A", "B", "C", "D"] * 2
    assert all(r["question"] == "<video 1>\nWhich pattern?" for cell in rows.values() for r in cell)


def test_heatmap_marks_cells_beyond_max_length(tmp_path):
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Rectangle

    frames, depths = [32, 64, 128], [0, 50, 100]
    accuracy = np.array([[1.0, 0.5, np.nan], [0.0, np.nan, np.nan], [1.0, 1.0, np.nan]])
    beyond = np.array([[False, False, True], [False, False, True], [False, False, True]])
    fig = draw(str(tmp_path / "h.png"), frames, depths, accuracy, beyond, max_length=1000)
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert shown.shape == (3, 3)
    assert list(np.ma.getmaskarray(shown).ravel()) == list((beyond | np.isnan(accuracy)).ravel())
    hatched = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches if isinstance(p, Rectangle)
               and p.get_facecolor() == to_rgba(BEYOND_COLOR)]
    assert sorted(hatched) == [(2.0, 0.0), (2.0, 1.0), (2.0, 2.0)]
    labels = {(t.get_position(), t.get_text()) for t in ax.texts}
    assert ((1, 1), "n/a") in labels and ((0, 0), "1.00") in labels and ((1, 0), "0.50") in labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "64", "128"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0%", "50%", "100%"]
    assert Image.open(tmp_path / "h.png").size[0] > 200


@pytest.mark.slow
def test_sophia_niah_through_swift_eval(tiny_model_dir, tmp_path):
    from swift_sophia.evaluation.prompt_length import PromptLength

    rng = random.Random(1)
    source = str(tmp_path / "film.mp4")
    write_mp4(source, render_clip(random_clip_spec(rng, 3), 6, size=56, seed=2))
    image = tmp_path / "needle.png"
    Image.fromarray(pattern_frame("concentric rings", 56)).save(image)
    question, options = "Which pattern is shown in one frame?", ["checkerboard", "concentric rings", "stripes"]
    # max_length between the 8- and the 64-frame prompts: the 64-frame column is beyond it
    lengths = PromptLength(tiny_model_dir)
    row_question = "<video 1>\n" + question
    max_length = lengths.tokens(row_question, options, 8) + 2 * lengths.tokens_per_frame
    out = tmp_path / "niah"
    cmd = [sys.executable, "-m", "swift_sophia", "niah", "--model", tiny_model_dir, "--output-dir", str(out),
           "--frames", "4,8,64", "--haystack", source, "--needle", str(image), "--question", question,
           *[a for o in options for a in ("--option", o)], "--answer", "concentric rings",
           "--max-length", str(max_length),
           "--swift-args", f"--infer_backend transformers --max_new_tokens 4 --eval_num_proc 2 --host 127.0.0.1 "
                           f"--port {free_port()} --eval_generation_config {shlex.quote(json.dumps({'retries': 1}))}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480,  # swift eval writes result/ in cwd
                          env=env(VIDEO_SEGMENTS="4"), cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    assert "replaced by 64" in proc.stdout  # the server read every frame of each haystack, not 4

    results = json.load(open(out / "niah_results.json"))
    assert results["frames"] == [4, 8, 64] and results["depths"] == [0, 25, 50, 75, 100]
    assert results["max_length"] == max_length
    cells = {(c["frames"], c["depth"]): c for c in results["cells"]}
    assert len(cells) == 15
    run = latest_run(str(out / "eval"))
    for (n, d), c in cells.items():
        assert c["prompt_tokens"] == lengths.tokens(row_question, options, n)
        assert c["beyond_max_length"] == (n == 64)
        if n == 64:
            assert c["accuracy"] is None and c["answered"] == 0
            assert not os.path.exists(out / "set" / f"{c['cell']}_val.jsonl")
        else:
            assert c["answered"] == 1 and c["accuracy"] in (0.0, 1.0)
            rows = predictions(run, c["cell"])
            assert len(rows) == 1 and rows[0]["model_output"]["error"] is None
            # the prompt the server built had exactly n frames of tokens: the count the cell was judged by
            assert rows[0]["model_output"]["usage"]["input_tokens"] == c["prompt_tokens"]
    png = Image.open(results["heatmap"])
    assert png.size[0] > 200 and png.size[1] > 200
    # the hatched grey of the beyond-max_length column is in the picture
    grey = np.array(Image.new("RGB", (1, 1), BEYOND_COLOR)).reshape(3)
    pixels = np.asarray(png.convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - grey).sum(axis=1) < 6).sum() > 500
