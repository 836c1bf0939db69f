"""A synthetic long-video task whose answer lives in one shot among many, for the miniature evaluation.

Each video has `num_shots` shots of `frames_per_shot` frames (hard cuts). Every shot but one is a plain colour or a
striped texture of two colours, with no shape. Exactly one shot, at a random position, shows a black shape
(circle, square or triangle) drifting on a coloured background. The question names the shape and asks for the
background colour of that shot, so the answer is in that one shot and nowhere else:

    "What color is the background of the shot that shows a triangle?"  ->  "yellow"

The options are the six colours of swift_sophia.video.synthetic_clips.COLORS in a fixed order by default
(`--num-options 4`: the answer and three others, shuffled, which also makes the model match the colour against the
option texts). The answer colour also appears as the background of other shots (consecutive shots always differ), so
the colour alone does not give it away. Rows are written twice from the same videos:

- ms-swift jsonl (`train.jsonl`, `val.jsonl`), the user turn being exactly the text that EvalScope's `general_vmcq`
  sends (swift_sophia.evaluation.vmcq.PROMPT_TEMPLATE: instruction, question, lettered options) with `<video>` where
  the video goes, the reply `ANSWER: X`. A checkpoint trained on them answers the evaluation's prompt as trained.
- a `general_vmcq` set (`eval_set/default_val.jsonl`, `eval_dataset_args.json`, `set.json`) of the held-out
  videos, for `swift eval` (docs/evaluation.md).

`manifest.json` records every video's shots (colours, texture, which shot has the shape, its frame span).

`--niah-inputs` writes the inputs of a needle-in-a-haystack test of this task instead (make_niah_inputs): a
haystack video of distractor shots only (`haystack.<container>`, --num-shots x --frames-per-shot frames) and
`needles.jsonl`, one answer shot per needle (every colour with every shape) with the training rows' question and
options, for `sophia niah --haystack OUT/haystack.mp4 --needles OUT/needles.jsonl`.

    sophia synthetic-shots OUT --num-train 256 --num-val 64
    sophia synthetic-shots NIAH_OUT --niah-inputs --num-shots 128 --frames-per-shot 2
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import random
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..video.avi import write_avi
from ..video.synthetic_clips import COLORS, SHAPES, _shape_mask, write_mp4

SHAPE_COLOR = (10, 10, 10)  # black: not in COLORS, so the shape shot is the only one with black pixels
QUESTION = "What color is the background of the shot that shows a {shape}?"
NUM_OPTIONS = len(COLORS)  # all six colours, always in the same order: the letter names the colour
WRITERS = {"mp4": write_mp4, "avi": write_avi}


def random_video_spec(rng: random.Random, num_shots: int = 16, *, stripe_rate: float = 0.5,
                      answer: Optional[str] = None) -> Dict:
    """Shots of one video: `background` (and `stripe`, the second colour of a striped shot, or None; a shot without
    the shape is striped with probability `stripe_rate`), and for exactly one shot (`answer_shot`) the `shape`.
    Consecutive shots never share their background. `answer` fixes the answer shot's background (balanced sets)."""
    if num_shots < 2:
        raise ValueError("a video needs at least 2 shots (one with the shape, one without)")
    names = list(COLORS)
    answer_shot = rng.randrange(num_shots)
    shape = rng.choice(SHAPES)
    shots, prev = [], None
    for i in range(num_shots):
        if i == answer_shot and answer is not None:
            bg = answer
        else:
            # the shot before a fixed answer colour must differ from it too
            avoid = {prev, answer if answer is not None and i == answer_shot - 1 else None}
            bg = rng.choice([c for c in names if c not in avoid])
        if i == answer_shot:
            shots.append({"background": bg, "stripe": None, "shape": shape})
        else:
            shots.append(_distractor_shot(rng, bg, stripe_rate))
        prev = bg
    return {"shots": shots, "answer_shot": answer_shot, "shape": shape,
            "answer": shots[answer_shot]["background"]}


def _distractor_shot(rng: random.Random, background: str, stripe_rate: float) -> Dict:
    """A shot without the shape: plain, or striped with a second colour with probability `stripe_rate`."""
    stripe = rng.choice([c for c in COLORS if c != background]) if rng.random() < stripe_rate else None
    return {"background": background, "stripe": stripe, "shape": None}


def distractor_shots(rng: random.Random, num_shots: int, *, stripe_rate: float = 0.5) -> List[Dict]:
    """`num_shots` shots without the shape, drawn as random_video_spec draws every shot but the answer shot
    (consecutive backgrounds differ): a haystack with no needle in it."""
    shots, prev = [], None
    for _ in range(num_shots):
        background = rng.choice([c for c in COLORS if c != prev])
        shots.append(_distractor_shot(rng, background, stripe_rate))
        prev = background
    return shots


def balanced_answers(rng: random.Random, count: int) -> List[str]:
    """`count` answer colours, each colour `count // len(COLORS)` or one more times, in random order."""
    names = list(COLORS)
    answers = [names[i % len(names)] for i in range(count)]
    rng.shuffle(answers)
    return answers


def render_video(spec: Dict, frames_per_shot: int, size: int = 56, seed: int = 0, noise: float = 4.0) -> np.ndarray:
    """uint8 [num_shots * frames_per_shot, size, size, 3], with Gaussian pixel noise of std `noise` (0: none, which
    compresses to a few hundred bytes a frame)."""
    rng = np.random.default_rng(seed)
    frames = []
    yy = np.arange(size)[:, None, None]
    for shot in spec["shots"]:
        bg = np.array(COLORS[shot["background"]], dtype=np.float32)
        base = np.broadcast_to(bg, (size, size, 3)).copy()
        if shot["stripe"] is not None:
            period = int(rng.integers(6, 12))
            mask = ((yy + np.arange(size)[None, :, None] * (rng.random() < 0.5)) // (period // 2)) % 2 == 1
            base = np.where(mask, np.array(COLORS[shot["stripe"]], dtype=np.float32), base)
        x0, y0 = rng.uniform(0.35, 0.65, size=2) * size
        dx, dy = rng.uniform(-1.0, 1.0, size=2)
        for t in range(frames_per_shot):
            img = base.copy()
            if shot["shape"] is not None:
                img[_shape_mask(shot["shape"], size, x0 + dx * t, y0 + dy * t, size * 0.22)] = SHAPE_COLOR
            if noise > 0:
                img += rng.normal(0.0, noise, size=img.shape)
            frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def options_for(spec: Dict, rng: random.Random, num_options: int = NUM_OPTIONS) -> List[str]:
    """All colours in COLORS' order when `num_options` is their number (the default: the letter stands for the
    colour, so a model need not match the colour against the option texts), else the answer colour and
    `num_options - 1` other colours, shuffled."""
    if num_options >= len(COLORS):
        return list(COLORS)
    others = rng.sample([c for c in COLORS if c != spec["answer"]], num_options - 1)
    options = others + [spec["answer"]]
    rng.shuffle(options)
    return options


def user_text(question: str, options: List[str]) -> str:
    """The user turn exactly as EvalScope's general_vmcq builds it from a row (`<video 1>\\n` + question), with
    ms-swift's `<video>` tag where the video goes. Without EvalScope (a machine that only trains) the same text is
    built here (tests/tools/test_synthetic_shots.py checks that the two agree)."""
    from ..evaluation.vmcq import PROMPT_TEMPLATE

    question = "<video 1>\n" + question
    try:
        from evalscope.utils.multi_choices import prompt
    except ImportError:
        letters = [chr(ord("A") + i) for i in range(len(options))]
        text = PROMPT_TEMPLATE.format(question=question, letters=",".join(letters),
                                      choices="\n".join(f"{x}) {o}" for x, o in zip(letters, options)))
    else:
        text = prompt(question=question, choices=list(options), template=PROMPT_TEMPLATE)
    return text.replace("<video 1>", "<video>")


def _without_video(text: str) -> str:
    return text.replace("<video>\n", "").replace("<video>", "")


def make_dataset(output_dir: str, num_train: int = 256, num_val: int = 64, *, num_shots: int = 16,
                 frames_per_shot: int = 2, size: int = 56, fps: int = 8, seed: int = 0,
                 num_options: int = NUM_OPTIONS, noise: float = 4.0, stripe_rate: float = 0.5,
                 balance: bool = False, container: str = "mp4", workers: int = 1,
                 min_shots: Optional[int] = None) -> Dict:
    """Write the videos, `train.jsonl`, `val.jsonl`, the `general_vmcq` set of the val videos in `eval_set/`, the
    two baselines of the val questions (`val_text_only.jsonl`: no video; `val_blank.jsonl`: every video replaced by
    one black video of the same length, `videos/blank.*`) and `manifest.json`; return the manifest. `balance`:
    each split's answer colours as evenly spread as its size allows. `container`: mp4 (H.264, PyAV) or avi
    (uncompressed, no encoder needed: for a machine without PyAV; width x height x 3 bytes a frame). `workers`:
    processes that render and write the videos (the files are the same for any number). `min_shots`: each training
    video gets between `min_shots` and `num_shots` shots (so between min_shots x frames_per_shot and num_shots x
    frames_per_shot frames; in the GPU study a small decoder trained on one length lost even the reply format at the
    lengths pruning and frame budgets give it, docs/miniature_study.md); held-out videos keep `num_shots`."""
    if min_shots is not None and not 2 <= min_shots <= num_shots:
        raise ValueError(f"min_shots must be between 2 and num_shots ({num_shots}), got {min_shots}")
    from ..evaluation.vmcq import LETTERS, Question, write_set

    write = _writer(container)
    rng = random.Random(seed)
    video_dir = os.path.abspath(os.path.join(output_dir, "videos"))
    os.makedirs(video_dir, exist_ok=True)
    frames = num_shots * frames_per_shot
    blank = os.path.join(video_dir, f"blank.{container}")
    write(blank, np.zeros((frames, size, size, 3), dtype=np.uint8), fps=fps)
    manifest = {"num_shots": num_shots, "min_shots": min_shots, "frames_per_shot": frames_per_shot, "frames": frames,
                "size": size, "fps": fps, "seed": seed, "noise": noise, "stripe_rate": stripe_rate,
                "balanced": balance, "video_dir": video_dir, "blank_video": blank, "videos": {}}
    questions: List[Question] = []
    videos = []  # (path, spec, render seed): rendered after the loop, in `workers` processes
    for split, count in (("train", num_train), ("val", num_val)):
        rows = []
        answers = balanced_answers(rng, count) if balance else [None] * count
        for i in range(count):
            shots = rng.randint(min_shots, num_shots) if min_shots is not None and split == "train" else num_shots
            spec = random_video_spec(rng, shots, stripe_rate=stripe_rate, answer=answers[i])
            video = os.path.join(video_dir, f"{split}_{i:05d}.{container}")
            videos.append((video, spec, rng.randrange(1 << 30)))
            options = options_for(spec, rng, num_options)
            letter = LETTERS[options.index(spec["answer"])]
            question = QUESTION.format(shape=spec["shape"])
            rows.append({"messages": [{"role": "user", "content": user_text(question, options)},
                                      {"role": "assistant", "content": f"ANSWER: {letter}"}],
                         "videos": [video]})
            a = spec["answer_shot"]
            manifest["videos"][video] = {**spec, "split": split, "question": question, "options": options,
                                         "letter": letter,
                                         "answer_frames": [a * frames_per_shot, (a + 1) * frames_per_shot]}
            if split == "val":
                questions.append(Question(qid=f"val_{i:05d}", subset="default", question=question,
                                          options=options, answer=letter, video=video,
                                          extra={"answer_shot": a, "shape": spec["shape"]}))
        _write_jsonl(os.path.join(output_dir, f"{split}.jsonl"), rows)
        if split == "val":
            _write_jsonl(os.path.join(output_dir, "val_text_only.jsonl"),
                         [{"messages": [{**r["messages"][0], "content": _without_video(r["messages"][0]["content"])},
                                        r["messages"][1]]} for r in rows])
            _write_jsonl(os.path.join(output_dir, "val_blank.jsonl"), [{**r, "videos": [blank]} for r in rows])
    render = functools.partial(_render_and_write, write=write, frames_per_shot=frames_per_shot, size=size, fps=fps,
                               noise=noise)
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.starmap(render, videos, chunksize=8)
    else:
        for job in videos:
            render(*job)
    if questions:
        # the videos were just written here: no need to decode them again (which takes PyAV)
        write_set(os.path.join(output_dir, "eval_set"), questions, name="synthetic_shots", subsets=["default"],
                  check_videos=False, info={"num_shots": num_shots, "frames_per_shot": frames_per_shot})
    with open(os.path.join(output_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def niah_needle_specs() -> List[Tuple[str, str]]:
    """(background, shape) of every needle: each colour with each shape once, needle k having colour k mod 6 and
    shape (k + k // 6) mod 3, so that any six consecutive needles (cyclically) ask every colour once, and needles
    0-5, 6-11 and 12-17 every shape twice. `sophia niah` hands the needles to its cells in order: with --samples 6,
    every cell asks every colour once and every shape twice."""
    names = list(COLORS)
    return [(names[k % len(names)], SHAPES[(k + k // len(names)) % len(SHAPES)])
            for k in range(len(names) * len(SHAPES))]


def make_niah_inputs(output_dir: str, *, num_shots: int = 64, frames_per_shot: int = 2, size: int = 56, fps: int = 8,
                     seed: int = 0, num_options: int = NUM_OPTIONS, noise: float = 4.0, stripe_rate: float = 0.5,
                     container: str = "mp4") -> Dict:
    """The inputs of `sophia niah --haystack ... --needles ...` for this task: `haystack.<container>`, a video of
    `num_shots` distractor shots (no shape shot; num_shots x frames_per_shot frames, rendered as the training
    videos' other shots), and `needles.jsonl` with one clip per needle in `needles/`, each an answer shot
    (frames_per_shot frames of a black shape on a coloured background) with the training rows' question and
    options and the background colour as the answer (niah_needle_specs: every colour with every shape). The
    haystack should be at least as long as the largest NIAH cell, so that no frame of it repeats in a cell.
    Returns what was written."""
    write = _writer(container)
    rng = random.Random(seed)
    haystack = os.path.join(output_dir, f"haystack.{container}")
    needles_path = os.path.join(output_dir, "needles.jsonl")
    os.makedirs(os.path.join(output_dir, "needles"), exist_ok=True)
    haystack_spec = {"shots": distractor_shots(rng, num_shots, stripe_rate=stripe_rate)}
    render = functools.partial(render_video, frames_per_shot=frames_per_shot, size=size, noise=noise)
    write(haystack, render(haystack_spec, seed=rng.randrange(1 << 30)), fps=fps)
    needles = []
    for background, shape in niah_needle_specs():
        spec = {"shots": [{"background": background, "stripe": None, "shape": shape}], "answer": background}
        clip = f"needles/{background}_{shape}.{container}"  # relative to needles.jsonl, as niah reads it
        write(os.path.join(output_dir, clip), render(spec, seed=rng.randrange(1 << 30)), fps=fps)
        needles.append({"needle": clip, "question": QUESTION.format(shape=shape),
                        "options": options_for(spec, rng, num_options), "answer": background,
                        "needle_frames": frames_per_shot})
    _write_jsonl(needles_path, needles)
    return {"haystack": haystack, "needles": needles_path, "frames": num_shots * frames_per_shot,
            "haystack_shots": haystack_spec["shots"], "num_needles": len(needles)}


def _writer(container: str):
    if container not in WRITERS:
        raise ValueError(f"container must be one of {', '.join(WRITERS)}, got {container!r}")
    return WRITERS[container]


def _render_and_write(path: str, spec: Dict, seed: int, *, write, frames_per_shot: int, size: int, fps: int,
                      noise: float) -> None:
    write(path, render_video(spec, frames_per_shot, size=size, seed=seed, noise=noise), fps=fps)


def _write_jsonl(path: str, rows: List[Dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def relocate(output_dir: str) -> int:
    """Point a dataset that was moved (e.g. written on one machine and carried to another) at its videos where they
    are now: the video folder recorded in `manifest.json` is replaced in every jsonl and json file of the dataset.
    Returns the number of files rewritten."""
    manifest_path = os.path.join(output_dir, "manifest.json")
    old = json.load(open(manifest_path))["video_dir"]
    new = os.path.abspath(os.path.join(output_dir, "videos"))
    if old == new:
        return 0
    changed = 0
    for folder, _, names in os.walk(output_dir):
        for name in names:
            if name.endswith((".json", ".jsonl")):
                path = os.path.join(folder, name)
                text = open(path).read()
                # paths sit inside JSON strings, where "/" is never escaped by json.dumps
                if old in text:
                    open(path, "w").write(text.replace(old, new))
                    changed += 1
    return changed


def cache_true_shots(manifest: Dict, cache_dir: Optional[str] = None) -> int:
    """Write every video's true shot boundaries (from the manifest) into the shot cache, under the key the
    template looks up (the video's content and the detection settings of this environment), so pruning uses them
    instead of TransNetV2's. Returns the number of entries written. Use a cache folder of its own
    (`SOPHIA_SHOT_CACHE`), since these entries are not the detector's."""
    from ..video.shot_cache import ShotCache, content_hash
    from ..video.shots import DetectionSettings, _store_entry, shot_cache_key

    settings = DetectionSettings.from_env()
    store = ShotCache(cache_dir)
    n, fps = manifest["frames_per_shot"], float(manifest["fps"])
    shots = {video: len(info["shots"]) for video, info in manifest["videos"].items()}
    if manifest.get("blank_video"):  # cut like the others: pruning on it needs no detector either
        shots[manifest["blank_video"]] = manifest["num_shots"]
    for video, count in shots.items():
        total = count * n
        entry = {"cuts": [i * n for i in range(1, count)], "total_frames": total, "fps": fps,
                 "detect_frames": total, "stride": 1}
        _store_entry(store, shot_cache_key(content_hash(video), settings), entry, settings)
    return len(shots)


def answer_seen(frames: List[int], answer_frames: List[int]) -> bool:
    """Whether any of the frames (native frame numbers) falls in the answer shot's span [start, end)."""
    return any(answer_frames[0] <= f < answer_frames[1] for f in frames)


def uniform_frames(total: int, k: int) -> List[int]:
    """The native frames that `VIDEO_SEGMENTS=k` samples from a `total`-frame video (the template's rule)."""
    from ..video.frames import sample_frame_indices

    return list(sample_frame_indices(total, k))


def pruned_frames(checkpoint: str, rows: List[Dict], *, alpha: float = 30, beta: float = 30,
                  frames: int = 32, max_frames: int = 0) -> List[List[int]]:
    """The native frames the checkpoint's pruner keeps for each ms-swift row, as the model selects them when it
    answers: the row goes through the checkpoint's own template (its query text, the shot cache) and one forward
    pass, and the pruner's selection is recorded."""
    import torch
    from swift.model import get_model_processor
    from swift.template import get_template
    from swift.utils import to_device

    from ..ms_swift import register  # noqa: F401
    os.environ.update(PRUNE_ALPHA=str(alpha), PRUNE_BETA=str(beta), VIDEO_SEGMENTS=str(frames),
                      PRUNE_MAX_FRAMES=str(max_frames))
    model, processor = get_model_processor(checkpoint, model_type="sophia", torch_dtype=torch.float32)
    template = get_template(processor, template_type="sophia")
    template.set_mode("train")
    model.eval()
    inner = getattr(model, "model", model)
    pruner = inner.pruner
    seen: List[List[int]] = []
    original = pruner.select

    def select(*args, **kwargs):
        sel = original(*args, **kwargs)
        seen.append(sel.keep.tolist())
        return sel

    pruner.select = select
    out = []
    try:
        with torch.no_grad():
            for row in rows:
                seen.clear()
                batch = template.data_collator([template.encode(row)])
                # on a GPU machine ms-swift places the model there; the collated batch is on the CPU
                model(**to_device({k: v for k, v in batch.items() if k != "labels"}, model.device))
                if len(seen) != 1:
                    raise RuntimeError(f"expected one pruner selection for {row['videos'][0]}, got {len(seen)}")
                out.append(seen[0])
    finally:
        pruner.select = original
    return out  # sampled positions; with `frames` = the video's frame count these are its native frames


def print_niah_inputs(written: Dict) -> None:
    print(f"haystack of {written['frames']} frames: {written['haystack']}\n"
          f"{written['num_needles']} needles: {written['needles']}\n"
          f"sophia niah --model CHECKPOINT --output-dir niah --haystack {written['haystack']} "
          f"--needles {written['needles']} --samples {len(COLORS)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`sophia synthetic-shots OUT`."""
    p = argparse.ArgumentParser(prog="sophia synthetic-shots", description=__doc__.split("\n\n")[0])
    p.add_argument("output_dir")
    p.add_argument("--num-train", type=int, default=256)
    p.add_argument("--num-val", type=int, default=64)
    p.add_argument("--num-shots", type=int, default=16)
    p.add_argument("--min-shots", type=int, default=None,
                   help="training videos get between this and --num-shots shots (default: all --num-shots), so the "
                        "decoder sees several video lengths")
    p.add_argument("--frames-per-shot", type=int, default=2)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-options", type=int, default=NUM_OPTIONS,
                   help=f"options per question (default {NUM_OPTIONS}: every colour, in a fixed order; fewer: the "
                        f"answer and random others, shuffled)")
    p.add_argument("--noise", type=float, default=4.0,
                   help="std of the pixel noise (default 4; 0 compresses far better: ~7 KB for 128 frames of 112 px "
                        "without stripes)")
    p.add_argument("--stripe-rate", type=float, default=0.5,
                   help="chance that a shot without the shape is striped (default 0.5; stripes cost most bytes)")
    p.add_argument("--container", default="mp4", choices=sorted(WRITERS),
                   help="mp4 (H.264, needs PyAV) or avi (uncompressed, needs nothing: for machines without PyAV)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the videos (default 1)")
    p.add_argument("--balance", action="store_true", help="answer colours spread evenly within each split")
    p.add_argument("--cache-true-shots", metavar="CACHE_DIR", default=None,
                   help="also write the true shot boundaries into this shot cache folder (instead of TransNetV2)")
    p.add_argument("--relocate", action="store_true",
                   help="write nothing new: point the dataset in OUTPUT_DIR, moved from where it was written, at its "
                        "videos where they are now (with --cache-true-shots: and cache its shots here)")
    p.add_argument("--niah-inputs", action="store_true",
                   help="write no dataset: the inputs of `sophia niah` for this task, OUTPUT_DIR/haystack.<container> "
                        "(--num-shots x --frames-per-shot frames of distractor shots; make it at least the largest "
                        "--frames of sophia niah, so no frame repeats in a cell) and OUTPUT_DIR/needles.jsonl (an "
                        "answer shot of --frames-per-shot frames for every colour and shape, with the training "
                        "question and options)")
    a = p.parse_args(argv)
    if a.niah_inputs and (a.relocate or a.cache_true_shots):
        p.error("--niah-inputs writes no dataset: it goes without --relocate and --cache-true-shots")
    if a.niah_inputs:
        print_niah_inputs(make_niah_inputs(a.output_dir, num_shots=a.num_shots, frames_per_shot=a.frames_per_shot,
                                           size=a.size, fps=a.fps, seed=a.seed, num_options=a.num_options,
                                           noise=a.noise, stripe_rate=a.stripe_rate, container=a.container))
        return 0
    if a.relocate:
        print(f"{relocate(a.output_dir)} files of {os.path.abspath(a.output_dir)} point at its videos")
        m = json.load(open(os.path.join(a.output_dir, "manifest.json")))
    else:
        m = make_dataset(a.output_dir, a.num_train, a.num_val, num_shots=a.num_shots,
                         frames_per_shot=a.frames_per_shot, size=a.size, fps=a.fps, seed=a.seed,
                         num_options=a.num_options, noise=a.noise, stripe_rate=a.stripe_rate, balance=a.balance,
                         container=a.container, workers=a.workers, min_shots=a.min_shots)
        varied = f" (train: {a.min_shots} to {a.num_shots} shots)" if a.min_shots is not None else ""
        print(f"{a.num_train} train + {a.num_val} val videos of {m['frames']} frames ({a.num_shots} shots x "
              f"{a.frames_per_shot}){varied} in {os.path.abspath(a.output_dir)}")
    if a.cache_true_shots:
        print(f"true shots of {cache_true_shots(m, a.cache_true_shots)} videos cached in {a.cache_true_shots}")
    return 0

__all__ = ["make_dataset", "make_niah_inputs", "niah_needle_specs", "relocate", "balanced_answers",
           "random_video_spec", "distractor_shots", "render_video", "options_for", "user_text", "cache_true_shots",
           "answer_seen", "uniform_frames", "pruned_frames", "main", "QUESTION"]
