"""Decoding the sampled frames of a long video: which strategy is fastest? Prints a markdown table.

    python benchmarks/bench_video_decode.py                          # 10 min of 720p at 30 fps, generated
    python benchmarks/bench_video_decode.py --minutes 60             # a real hour (108,000 frames to encode)
    python benchmarks/bench_video_decode.py --video /data/movie.mp4  # your own file

The frame counts are FPS sampling of an hour (--per-hour, default 256 1,024 4,096 frames an hour, i.e. FPS =
N / 3600): the same rate is applied to the video's real duration, so the spacing between sampled frames (what
decoding cost depends on) is the hour's, and the table also gives the time scaled to an hour (decoding cost
grows linearly with the duration at a fixed rate). Each cell is the median of --repeats runs (a cell runs once
when the whole benchmark has used up --budget seconds). Strategies (frames are checked equal to the first,
except the resized ones):

* ``decord-1``: decord ``get_batch``, 1 thread (the loading path before this benchmark)
* ``decord-auto``: decord ``get_batch``, FFmpeg's automatic thread count
* ``decord-small``: decord decoding at a reduced size (its scaler: widths that are multiples of 32 only)
* ``pyav-seq``: PyAV, frame threading, decoding every frame up to the last sampled one, converting only the
  sampled ones to RGB
* ``pyav-seek``: PyAV as ``pyav-seq``, but seeking to the keyframe before a sampled frame when that keyframe lies
  beyond the current position (``swift_sophia.video.frames.PyAVReader``, full size)
* ``pyav-seek xN``, ``load_video-448 xN`` (N in --decoders, > 1): the same with N decoders at once, each over a run
  of consecutive sampled frames in a thread of its own (``PyAVReader(segments=N)``, ``SOPHIA_DECODE_SEGMENTS=N``;
  at least 64 frames a run)
* ``load_video-448``: the production path (``swift_sophia.video.frames.load_video`` with the template's FPS sampling,
  PyAV seek, full-size frames resized to 448x448, the real model's vision input)
* ``shots-apart-448``: ``load_video-448``, then every frame decoded for the shot detector (``decode_small_frames``:
  decord at 96x54), what the template does with pruning on when the video's shots are not cached

Needs only numpy, torch, decord, av (PyAV) and this repository; no network. The generated video has a moving
texture with a cut every 7 s and a keyframe every --gop-seconds (x264 ``ultrafast``, CRF 28).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from swift_sophia.video.frames import DecordReader, FrameSampling, PyAVReader, load_video, sample_frame_indices  # noqa: E402
from swift_sophia.video.shot_frames import decode_small_frames  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_shots import cpu_name  # noqa: E402  (the machine's name, as the shot benchmark prints it)


def generate(path: str, minutes: float, height: int, fps: int, gop_seconds: float) -> float:
    """Write an H.264 mp4 (width = 16:9 of ``height``); returns the encoding time."""
    import av
    h = height - height % 2
    w = (h * 16 // 9) // 2 * 2
    n = int(round(minutes * 60 * fps))
    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(4):  # one texture per scene, twice the frame size; the camera pans over it
        small = rng.integers(16, 235, (h // 16 + 1, w // 8 + 1), dtype=np.uint8)
        scenes.append(np.ascontiguousarray(np.kron(small, np.ones((32, 16), np.uint8))[:2 * h, :2 * w]))
    buf = np.empty((h * 3 // 2, w), np.uint8)
    t0 = time.perf_counter()
    with av.open(path, 'w') as out:
        st = out.add_stream('libx264', rate=fps)
        st.width, st.height, st.pix_fmt = w, h, 'yuv420p'
        st.options = {'preset': 'ultrafast', 'crf': '28', 'g': str(max(1, int(gop_seconds * fps)))}
        for i in range(n):
            scene = (i // (7 * fps)) % len(scenes)  # a cut every 7 s
            dy, dx = (i * 3) % h, (i * 5) % w
            buf[:h] = scenes[scene][dy:dy + h, dx:dx + w]
            buf[h:] = 100 + 30 * scene
            frame = av.VideoFrame.from_ndarray(buf, format='yuv420p')
            frame.pts = i
            for packet in st.encode(frame):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--video', default=None, help='an existing video (default: generate one)')
    ap.add_argument('--minutes', type=float, default=10.0, help='length of the generated video')
    ap.add_argument('--height', type=int, default=720, help='height of the generated video (16:9)')
    ap.add_argument('--fps', type=int, default=30, help='frame rate of the generated video')
    ap.add_argument('--gop-seconds', type=float, default=5.0, help='keyframe interval of the generated video')
    ap.add_argument('--per-hour', type=int, nargs='+', default=[256, 1024, 4096],
                    help='frames sampled per hour of video (FPS = N / 3600)')
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--budget', type=float, default=150.0,
                    help='seconds of timing after which every remaining cell runs once')
    ap.add_argument('--size', type=int, default=448, help='vision input size of the production path')
    ap.add_argument('--strategies', nargs='+', default=None, help='a subset of the strategies')
    ap.add_argument('--decoders', type=int, nargs='+', default=None,
                    help='decoders at once for the "xN" strategies (default: 2 and one per 4 cores)')
    args = ap.parse_args(argv)

    gen_note = ''
    path = args.video
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix='sophia-decode-'), 'long.mp4')
        t = generate(path, args.minutes, args.height, args.fps, args.gop_seconds)
        gen_note = f'generated in {t:.0f} s'
        print(f'{gen_note}: {path}', file=sys.stderr, flush=True)
    probe = PyAVReader(path)
    total, vfps = len(probe), probe.fps
    duration = total / vfps
    keys = len(probe.keys)
    w, h = probe.width, probe.height
    small_h = max(32, args.size)  # decord's scaler: width a multiple of 32, short side >= the vision input
    small_w = int(np.ceil(small_h * w / h / 32.0) * 32)

    def pyav_seq(indices):  # every frame decoded up to the last wanted one; only wanted ones converted
        import av
        wanted = set(indices)
        last = max(indices)
        out = {}
        with av.open(path) as c:
            s = c.streams.video[0]
            s.thread_type = 'AUTO'
            for i, fr in enumerate(c.decode(s)):
                if i in wanted:
                    out[i] = fr.to_ndarray(format='rgb24')
                if i >= last:
                    break
        return np.stack([out[i] for i in indices])

    def by_rate(per_hour):
        return FrameSampling(num_frames=None, fps=per_hour / 3600.0, min_frames=1, max_frames=10 ** 9)

    def frames_and_shot_input_apart(per_hour):  # the sampled frames, then every frame for the shot detector
        frames = load_video(path, by_rate(per_hour), size=args.size).frames
        decode_small_frames(path)
        return frames

    strategies = {
        'decord-1': lambda ix, n: DecordReader(path, num_threads=1).get(ix),
        'decord-auto': lambda ix, n: DecordReader(path, num_threads=0).get(ix),
        f'decord-small ({small_w}x{small_h})': lambda ix, n: DecordReader(path, 0, size=(small_w, small_h)).get(ix),
        'pyav-seq': lambda ix, n: pyav_seq(ix),
        'pyav-seek': lambda ix, n: PyAVReader(path).get(ix),
        f'load_video-{args.size}': lambda ix, n: load_video(path, by_rate(n), size=args.size).frames,
        f'shots-apart-{args.size}': lambda ix, n: frames_and_shot_input_apart(n),
    }
    decoders = args.decoders or sorted({2, max(2, (os.cpu_count() or 1) // 4)})

    def with_decoders(n_decoders, fn):
        def run(ix, n):
            old = os.environ.get('SOPHIA_DECODE_SEGMENTS')
            os.environ['SOPHIA_DECODE_SEGMENTS'] = str(n_decoders)
            try:
                return fn(ix, n)
            finally:
                os.environ.pop('SOPHIA_DECODE_SEGMENTS') if old is None else os.environ.update(
                    SOPHIA_DECODE_SEGMENTS=old)
        return run

    for d in decoders:
        if d > 1:
            strategies[f'pyav-seek x{d}'] = lambda ix, n, d=d: PyAVReader(path, segments=d).get(ix)
            strategies[f'load_video-{args.size} x{d}'] = with_decoders(
                d, lambda ix, n: load_video(path, by_rate(n), size=args.size).frames)
    strategies['pyav-seek'] = with_decoders(1, strategies['pyav-seek'])
    strategies[f'load_video-{args.size}'] = with_decoders(1, strategies[f'load_video-{args.size}'])
    if args.strategies:
        strategies = {k: v for k, v in strategies.items() if any(k.startswith(s) for s in args.strategies)}

    rows = []
    t_start = time.perf_counter()
    for per_hour in args.per_hour:
        n = FrameSampling(num_frames=None, fps=per_hour / 3600.0, min_frames=1, max_frames=10 ** 9).count(total, vfps)
        ix = sample_frame_indices(total, n)
        ref = None
        for name, fn in strategies.items():
            times = []
            check = ''
            reps = args.repeats if time.perf_counter() - t_start < args.budget else 1
            for r in range(reps):
                t0 = time.perf_counter()
                frames = fn(ix, per_hour)
                times.append(time.perf_counter() - t0)
                if r == 0:
                    if ref is None and frames.shape[1:3] == (h, w):
                        ref = frames
                        check = 'reference'
                    elif ref is not None and frames.shape == ref.shape:
                        check = 'identical' if np.array_equal(frames, ref) else \
                            f'DIFFERENT (max {np.abs(frames.astype(np.int16) - ref).max()})'
                    else:
                        check = f'resized to {frames.shape[2]}x{frames.shape[1]}'
                del frames
            med = statistics.median(times)
            rows.append((per_hour, n, name, med, med * 3600.0 / duration, n / med, check, reps))
            print(f'  {per_hour}/h -> {n} frames, {name}: {med:.2f} s ({reps} runs)', file=sys.stderr, flush=True)
        del ref

    cores = os.cpu_count()
    print(f'\n## Decoding sampled frames ({cpu_name()}, {cores} cores; PyAV {__import__("av").__version__}, '
          f'decord {__import__("decord").__version__})\n')
    src = os.path.basename(path) if args.video else f'generated H.264 ({gen_note}), x264 ultrafast CRF 28'
    print(f'Video: {src}; {w}x{h}, {total} frames at {vfps:g} fps ({duration / 60:.1f} min), {keys} keyframes '
          f'(one every {duration / max(1, keys):.1f} s). Median of up to {args.repeats} runs.\n')
    print('| frames/hour (FPS) | frames here | strategy | seconds | seconds per hour of video | frames/s | frames |')
    print('|---|---|---|---|---|---|---|')
    for per_hour, n, name, med, hour, fps_, check, reps in rows:
        print(f'| {per_hour} ({per_hour / 3600:.3g}) | {n} | {name} | {med:.2f} | {hour:.1f} | {fps_:.0f} | {check} |')
    print(f'\ntotal benchmark time {time.perf_counter() - t_start:.0f} s (plus generation)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
