"""The video needle-in-a-haystack set: for every haystack size N and depth d, an N-frame video whose frames are
taken from a haystack video (or generated shots), with the needle (an image, or a short clip) inserted at d % of it,
and the needle's multiple-choice question.

The set is a `general_vmcq` set (swift_sophia.evaluation.vmcq) with one subset per cell, `frames<N>_depth<d>`, so
EvalScope scores every cell; the cell's videos are `videos/<cell>_<sample>.mp4`. Frames are written at the model's
input size (the template decodes to it anyway) and streamed to the encoder a chunk at a time, so a 2048-frame
haystack never sits in memory whole.

Generated needle (no --needle): a black-and-white pattern frame (checkerboard, stripes, rings) that appears nowhere
in the coloured haystack; the question asks which pattern it is. Generated haystack (no --haystack): shots of a
plain colour with a drifting shape (swift_sophia.video.synthetic_clips).

Given needles (--needles, load_needles): a jsonl file of needles, each with its own question, options and answer.
Sample s of the cell numbered c (cells in --frames, then --depths order) asks needle (c x samples + s) mod the
number of needles (needle_index): the needles follow each other down every cell and on through the grid, so over the
grid every needle is asked as often as any other (within one), and in every cell too when samples is a multiple of
their number. A file whose every run of `samples` consecutive needles has balanced answers (as `sophia
synthetic-shots --niah-inputs` writes it) gives balanced answers in every cell.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import numpy as np

from .vmcq import LETTERS, Question, SetError, answer_letter

PATTERNS = ("checkerboard", "horizontal stripes", "vertical stripes", "concentric rings")
PATTERN_QUESTION = ("One frame of this video shows a black-and-white pattern that appears nowhere else in it. "
                    "Which pattern is it?")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
CHUNK = 256


def cell_name(frames: int, depth: int) -> str:
    return f"frames{frames}_depth{depth}"


def pattern_frame(name: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(4, size // 8)
    if name == "checkerboard":
        on = ((yy // period) + (xx // period)) % 2 == 0
    elif name == "horizontal stripes":
        on = (yy // period) % 2 == 0
    elif name == "vertical stripes":
        on = (xx // period) % 2 == 0
    elif name == "concentric rings":
        on = (np.hypot(yy - size / 2, xx - size / 2) // period) % 2 == 0
    else:
        raise ValueError(f"unknown pattern {name!r}")
    return np.repeat((on * 255).astype(np.uint8)[..., None], 3, axis=2)


@dataclass
class Needle:
    frames: np.ndarray  # uint8 [k, size, size, 3]
    question: str
    options: List[str]
    answer: str  # letter


def pattern_needle(rng: random.Random, size: int, num_frames: int = 1) -> Needle:
    i = rng.randrange(len(PATTERNS))
    frame = pattern_frame(PATTERNS[i], size)
    return Needle(np.repeat(frame[None], num_frames, axis=0), PATTERN_QUESTION, list(PATTERNS), LETTERS[i])


NEEDLE_KEYS = ("needle", "question", "options", "answer")
OPTIONAL_NEEDLE_KEYS = ("needle_frames",)


def load_needles(path: str, size: int, num_frames: Optional[int] = None) -> List[Needle]:
    """The needles of a jsonl file, one JSON object a line: {"needle": an image or a clip (a relative path is
    relative to the file's folder), "question": text, "options": [text, ...], "answer": a letter or an option's
    text, optionally "needle_frames": the frames it spans, else `num_frames`, as load_needle}. Each needle is read
    once; any problem is a SetError naming the file and the line."""
    if not os.path.isfile(path):
        raise SetError(f"needles file not found: {path}")
    from ..video.source import VideoError

    folder = os.path.dirname(os.path.abspath(path))
    needles = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                needles.append(_needle_of_line(line, folder, size, num_frames))
            except (SetError, VideoError) as exc:
                raise SetError(f"{path} line {number}: {exc}") from None
    if not needles:
        raise SetError(f"{path}: no needles in it")
    return needles


def _needle_of_line(line: str, folder: str, size: int, num_frames: Optional[int]) -> Needle:
    entry = _needle_entry(line)
    return load_needle(os.path.join(folder, entry["needle"]), size, entry.get("needle_frames", num_frames),
                       entry["question"], entry["options"], entry["answer"])


def _needle_entry(line: str) -> dict:
    """One line of a needles file, its keys and values checked (SetError naming the problem)."""
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SetError(f"not valid JSON ({exc})") from None
    if not isinstance(entry, dict):
        raise SetError(f"expected a JSON object with keys {', '.join(NEEDLE_KEYS)}, got {line.strip()[:80]}")
    missing = [key for key in NEEDLE_KEYS if key not in entry]
    if missing:
        raise SetError(f"missing key {', '.join(missing)} (each line needs {', '.join(NEEDLE_KEYS)})")
    unknown = sorted(set(entry) - set(NEEDLE_KEYS) - set(OPTIONAL_NEEDLE_KEYS))
    if unknown:
        raise SetError(f"unknown key {', '.join(unknown)} (keys: {', '.join(NEEDLE_KEYS + OPTIONAL_NEEDLE_KEYS)})")
    needle, question, options = entry["needle"], entry["question"], entry["options"]
    if not isinstance(needle, str) or not needle:
        raise SetError(f"needle must be the path of an image or a clip, got {needle!r}")
    if not isinstance(question, str) or not question.strip():
        raise SetError(f"question must be text, got {question!r}")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise SetError(f"options must be a list of two or more texts, got {options!r}")
    frames = entry.get("needle_frames")
    if frames is not None and (type(frames) is not int or frames < 1):
        raise SetError(f"needle_frames must be a positive integer, got {frames!r}")
    try:
        answer_letter(entry["answer"], options, "needle")
    except SetError:
        raise SetError(f"answer {entry['answer']!r} is neither a letter nor one of the options {options}") from None
    return entry


def needle_index(cell_index: int, sample: int, samples: int, count: int) -> int:
    """Which of `count` needles sample `sample` of the cell numbered `cell_index` asks (see the module's text)."""
    return (cell_index * samples + sample) % count


def load_needle(path: str, size: int, num_frames: Optional[int], question: str, options: Sequence[str],
                answer: str) -> Needle:
    """An image (shown for `num_frames` frames, default 1) or a clip (`num_frames` frames sampled, default all,
    at most 16)."""
    if not os.path.isfile(path):
        raise SetError(f"needle file not found: {path}")
    if not question or len(options) < 2 or answer is None:
        raise SetError("a --needle needs its --question, two or more --option and the --answer")
    options = list(options)
    letter = answer_letter(answer, options, "needle")
    if path.lower().endswith(IMAGE_EXTENSIONS):
        from PIL import Image

        with Image.open(path) as im:
            frame = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
        frames = np.repeat(frame[None], num_frames or 1, axis=0)
    else:
        from ..video.frames import load_video

        clip = load_video(path, num_frames or 16, size=size)
        frames = clip.frames
    return Needle(frames, question, options, letter)


def _video_haystack(path: str, n: int, size: int) -> Iterator[np.ndarray]:
    """n frames spread over the video (frames repeat, in order, when it has fewer), a chunk at a time."""
    from ..video.frames import decode_frames, open_reader, sample_frame_indices
    from ..video.source import resolve_video_source

    source, _ = resolve_video_source(path)
    reader = open_reader(source)
    picked = sample_frame_indices(len(reader), n)
    indices = [picked[i * len(picked) // n] for i in range(n)]
    for start in range(0, n, CHUNK):
        yield decode_frames(reader, indices[start:start + CHUNK], (size, size), src=source)


def _generated_haystack(n: int, size: int, rng: random.Random) -> Iterator[np.ndarray]:
    from ..video.synthetic_clips import random_clip_spec, render_clip

    made = 0
    while made < n:
        shot = random_clip_spec(rng, num_shots=1)
        length = min(n - made, rng.randint(8, 24))
        yield render_clip(shot, length, size=size, seed=rng.randrange(1 << 30))
        made += length


def haystack_with_needle(n: int, depth: int, needle: Needle, size: int, haystack: Optional[str],
                         rng: random.Random) -> Iterator[np.ndarray]:
    """The cell's frames: n - k haystack frames with the k needle frames at position round(d % x (n - k))."""
    k = len(needle.frames)
    if k >= n:
        raise SetError(f"the needle has {k} frames: a haystack of {n} frames cannot hold it")
    at = round(depth / 100 * (n - k))
    chunks = _video_haystack(haystack, n - k, size) if haystack else _generated_haystack(n - k, size, rng)
    done = 0
    for chunk in chunks:
        if done <= at < done + len(chunk):
            cut = at - done
            yield chunk[:cut]
            yield needle.frames
            yield chunk[cut:]
        else:
            yield chunk
        done += len(chunk)
    if at == done:  # depth 100 %: the needle is the last frames
        yield needle.frames


def write_frames(path: str, chunks: Iterator[np.ndarray], fps: float) -> int:
    import av

    written = 0
    with av.open(path, mode="w") as container:
        stream = None
        for chunk in chunks:
            for frame in chunk:
                if stream is None:
                    stream = container.add_stream("libx264", rate=max(1, round(fps)))
                    stream.width, stream.height = frame.shape[1], frame.shape[0]
                    stream.pix_fmt = "yuv420p"
                    stream.options = {"crf": "20"}
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
                written += 1
        for packet in stream.encode():
            container.mux(packet)
    return written


def build_cells(out_dir: str, *, frames: Sequence[int], depths: Sequence[int], size: int,
                haystack: Optional[str] = None, needles: Sequence[Needle] = (), samples: int = 1, fps: float = 1.0,
                seed: int = 0) -> List[Question]:
    """Write every cell's videos under out_dir/videos; the questions, one subset per cell. Given `needles` (one or
    more) are shared out by needle_index, each question recording its needle's number; without them, generated
    ones."""
    if haystack and not os.path.isfile(haystack):
        raise SetError(f"haystack video not found: {haystack}")
    given = list(needles)
    if len(given) == 1 and samples != 1:
        raise SetError("--samples > 1 needs several needles (--needles) or generated ones: a single given needle "
                       "would be asked the same way in every sample")
    video_dir = os.path.join(out_dir, "videos")
    os.makedirs(video_dir, exist_ok=True)
    questions = []
    cells = [(n, d) for n in frames for d in depths]
    for cell_index, (n, d) in enumerate(cells):
        cell = cell_name(n, d)
        for s in range(samples):
            rng = random.Random(f"{seed}-{n}-{d}-{s}")
            extra = {"frames": n, "depth": d}
            if given:
                extra["needle"] = needle_index(cell_index, s, samples, len(given))
                cell_needle = given[extra["needle"]]
            else:
                cell_needle = pattern_needle(rng, size)
            path = os.path.join(video_dir, f"{cell}_{s}.mp4")
            count = write_frames(path, haystack_with_needle(n, d, cell_needle, size, haystack, rng), fps)
            if count != n:
                raise SetError(f"cell {cell}: wrote {count} frames, expected {n}")
            questions.append(Question(qid=f"{cell}/{s}", subset=cell, question=cell_needle.question,
                                      options=cell_needle.options, answer=cell_needle.answer, video=path,
                                      extra=extra))
    return questions
