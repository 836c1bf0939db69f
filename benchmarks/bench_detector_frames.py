"""The shot detector's frames (every frame of a file at TransNetV2's 48x27) from one PyAV decoder, from several in
threads, and from several worker processes: seconds, cores busy (CPU time of this process and its children over
wall time) and a checksum of the frames (equal in every row). Median of repeated runs.

    python benchmarks/bench_detector_frames.py VIDEO [--decoders N [N ...]] [--repeats 3]

Each of N decoders gets cores / N decoder threads (SOPHIA_DECODE_SEGMENTS=N, as `swift infer` and `swift deploy`
would run with it).
"""
import argparse
import os
import platform
import statistics
import time

import numpy as np
from bench_8b import cpu_seconds

from swift_sophia.video import shot_frames
from swift_sophia.video.frames import PyAVReader


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("video")
    parser.add_argument("--decoders", type=int, nargs="+", default=[max(2, (os.cpu_count() or 1) // 4)])
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    data = open(a.video, "rb").read()
    cases = [("1 decoder", a.video, 1)]
    for n in a.decoders:
        cases += [(f"{n} decoders in threads (the video as bytes)", data, n),
                  (f"{n} worker processes (the video as a file)", a.video, n)]
    rows = {}
    for _ in range(a.repeats):
        for name, src, decoders in cases:
            os.environ["SOPHIA_DECODE_SEGMENTS"] = str(decoders)
            reader = PyAVReader(src)
            t, c = time.perf_counter(), cpu_seconds()
            frames = shot_frames.decode_small_frames(src, reader=reader)
            wall, busy = time.perf_counter() - t, (cpu_seconds() - c)
            rows.setdefault(name, []).append((wall, busy / wall, int(frames.astype(np.int64).sum())))
    print(f"{len(frames)} frames of {os.path.basename(a.video)}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; median of {a.repeats}\n")
    print("| decoders | seconds | cores busy | checksum |\n|---|---|---|---|")
    for name, runs in rows.items():
        print(f"| {name} | {statistics.median(r[0] for r in runs):.2f} | {statistics.median(r[1] for r in runs):.2f} "
              f"| {runs[0][2]} |")


if __name__ == "__main__":
    main()
