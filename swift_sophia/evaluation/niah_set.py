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
"""
from __future__ import annotations

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
                haystack: Optional[str] = None, needle: Optional[Needle] = None, samples: int = 1,
                fps: float = 1.0, seed: int = 0) -> List[Question]:
    """Write every cell's videos under out_dir/videos; the questions, one subset per cell."""
    if haystack and not os.path.isfile(haystack):
        raise SetError(f"haystack video not found: {haystack}")
    if needle is not None and samples != 1:
        raise SetError("--samples > 1 needs generated needles (a given needle would be asked the same way)")
    video_dir = os.path.join(out_dir, "videos")
    os.makedirs(video_dir, exist_ok=True)
    questions = []
    for n in frames:
        for d in depths:
            cell = cell_name(n, d)
            for s in range(samples):
                rng = random.Random(f"{seed}-{n}-{d}-{s}")
                cell_needle = needle or pattern_needle(rng, size)
                path = os.path.join(video_dir, f"{cell}_{s}.mp4")
                count = write_frames(path, haystack_with_needle(n, d, cell_needle, size, haystack, rng), fps)
                if count != n:
                    raise SetError(f"cell {cell}: wrote {count} frames, expected {n}")
                questions.append(Question(qid=f"{cell}/{s}", subset=cell, question=cell_needle.question,
                                          options=cell_needle.options, answer=cell_needle.answer, video=path,
                                          extra={"frames": n, "depth": d}))
    return questions
