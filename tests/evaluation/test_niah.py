"""Video needle-in-a-haystack: the set (needle at its depth, N frames per cell), the heatmap, and `sophia niah` on the
tiny default through `swift eval` (random weights: the accuracy is meaningless, every cell's pipeline is not)."""
import json
import os
import random
import shlex
import subprocess
import sys

import av
import numpy as np
import pytest
from PIL import Image

from deploy_process import free_port
from swift_cli import env
from swift_sophia.evaluation.heatmap import BEYOND_COLOR, draw
from swift_sophia.evaluation.niah_set import PATTERNS, build_cells, load_needle, pattern_frame
from swift_sophia.evaluation.report import latest_run, predictions
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
                            needle=needle)
    for q, n in zip(questions, [8, 40]):
        frames = _frames(q.video)
        assert len(frames) == n  # 40 > the film's 15 frames: its frames repeat, in order
        at = round(0.5 * (n - 2))
        assert _grey(frames) == [at, at + 1]
        assert q.question == "Which pattern?" and q.answer == "B"
    with pytest.raises(ValueError, match="needle file not found: .*missing.png"):
        load_needle(str(tmp_path / "missing.png"), 48, 1, "q", ["a", "b"], "a")


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
