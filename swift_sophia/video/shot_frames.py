"""What TransNetV2 sees: every frame of a video, small (uint8 ``[T, 27, 48, 3]``).

decord decodes at 96x54 (its scaler accepts widths that are multiples of 32 only; 48x27 gives garbage) and 2x2
blocks are averaged. Where decord cannot decode the file at all (it opens but cannot copy the frames of videos 48
or 72 pixels wide, or does not open it), PyAV decodes it (swscale's bilinear filter to 96x54, which is decord's:
within one level of it, then the same pooling).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import List, Optional, Sequence

import numpy as np

from . import pyav_runs
from .frames import DecordReader, PyAVReader, _in_threads, _split, decode_segments, resize_frames
from .shot_detector import INPUT_H, INPUT_W
from .source import VideoDecodeError, VideoNotFoundError, VideoSource, describe
from .transnet_isolation import fork_guard

logger = logging.getLogger(__name__)

DECODE_H, DECODE_W = 2 * INPUT_H, 2 * INPUT_W  # decord output, then 2x2 mean pooling
PYAV_INTERPOLATION = 'BILINEAR'  # swscale's filter that gives decord's 96x54 frames
PYAV_RUN_FRAMES = 4096
POOL_CHUNK_FRAMES = 256  # frames read from a worker process and pooled at a time
# a worker process starts Python and PyAV in about 0.1-0.2 s: give each at least this many frames (about 1 s of work)
WORKER_MIN_FRAMES = 1024


def detector_processes(frames: int) -> int:
    """Worker processes that decode a file's `frames` detector frames: `SOPHIA_DECODE_SEGMENTS` when set, else one per
    core (each then with one decoder thread; in a data loader's worker, one per core of its share), each with at
    least WORKER_MIN_FRAMES frames. A worker decodes and scales one frame after another, about 1 ms a frame; four of
    them, with four decoder threads each, kept 2.7 of an H100 host's 16 cores busy (docs/benchmarks.md), and on 2
    cores a second decoder thread made a worker slower."""
    if os.environ.get('SOPHIA_DECODE_SEGMENTS', '').strip():
        return decode_segments(frames)
    return max(1, min(_cores_of_this_process(), frames // WORKER_MIN_FRAMES))


def _cores_of_this_process() -> int:
    """The machine's cores, shared among the data loader's workers when this is one (`swift sft` decodes uncached
    videos in several at once)."""
    cores = os.cpu_count() or 1
    torch = sys.modules.get('torch')
    worker = torch.utils.data.get_worker_info() if torch is not None else None
    return max(1, cores // worker.num_workers) if worker is not None else cores


def _pool_to_input(frames: np.ndarray) -> np.ndarray:
    if frames.shape[1:3] == (DECODE_H, DECODE_W):
        x = frames.reshape(len(frames), INPUT_H, 2, INPUT_W, 2, 3).astype(np.uint16).sum((2, 4))
        return ((x + 2) // 4).astype(np.uint8)
    return resize_frames(frames, (INPUT_W, INPUT_H))


class _DecordFailed(Exception):
    pass


def open_small_reader(src: VideoSource, num_threads: int = 0):
    """decord at 96x54 (full size where its scaler refuses), else PyAV. Raises VideoDecodeError."""
    try:
        return DecordReader(src, num_threads=num_threads, size=(DECODE_W, DECODE_H))
    except (VideoNotFoundError, TypeError):
        raise
    except Exception as decord_error:  # noqa: BLE001
        try:
            return PyAVReader(src, num_threads)
        except Exception as exc:  # noqa: BLE001
            raise VideoDecodeError(f'cannot decode video {describe(src)}: {str(decord_error).splitlines()[0]}; '
                                   f'PyAV: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}') \
                from exc


def _decord_small(reader: DecordReader, idx, chunk: int) -> np.ndarray:
    out = np.empty((len(idx), INPUT_H, INPUT_W, 3), dtype=np.uint8)
    bad = 0
    good = False
    for s in range(0, len(idx), chunk):
        part = idx[s:s + chunk]
        try:
            out[s:s + len(part)] = _pool_to_input(reader.get(part))
            good = True
            continue
        except Exception:  # noqa: BLE001 - a frame decord cannot read: decode this chunk frame by frame
            pass
        for k, i in enumerate(part):
            try:
                out[s + k] = _pool_to_input(reader.get([i]))[0]
                good = True
            except Exception as exc:  # noqa: BLE001
                if not good:  # not one frame so far: decord cannot decode this file, PyAV takes over
                    raise _DecordFailed(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                bad += 1
                out[s + k] = out[s + k - 1]
    if bad:
        logger.warning('%d of %d frames could not be decoded; repeated the previous frame', bad, len(idx))
    return out


def decode_small_frames(src: VideoSource, indices: Optional[Sequence[int]] = None, *, num_threads: int = 0,
                        chunk: int = 512, reader=None) -> np.ndarray:
    """Frames (all, or the given native indices) as TransNetV2 input: uint8 ``[T, 27, 48, 3]``.

    Frames decord fails on (some files end with unreadable frames) are replaced by the previous good frame, with
    a warning; when decord cannot decode the first frame it tries, PyAV decodes the whole request."""
    fork_guard()
    reader = reader if reader is not None else open_small_reader(src, num_threads)
    n = len(reader)
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    if any(i < 0 or i >= n for i in idx):
        raise IndexError(f'frame index out of range for a video of {n} frames')
    if isinstance(reader, DecordReader):
        try:
            return _decord_small(reader, idx, chunk)
        except _DecordFailed as exc:
            logger.info('decord cannot decode %s (%s); decoding with PyAV', describe(src), exc)
            reader = PyAVReader(src, num_threads)
            if len(reader) != n:
                raise VideoDecodeError(f'decord cannot decode {describe(src)} ({exc}) and PyAV counts '
                                       f'{len(reader)} frames, not {n}') from None
    runs = decode_segments(len(idx)) if reader.parallel else 1
    processes = detector_processes(len(idx)) if reader.parallel else 1
    if processes > 1 and isinstance(src, (str, os.PathLike)) and idx == sorted(set(idx)):
        return _small_frames_in_processes(reader, os.fspath(src), idx, processes)
    # PyAV splits a request among its decoders, each starting at the keyframe before its first frame: requests of
    # PYAV_RUN_FRAMES a decoder keep the frames decoded in vain (up to a GOP a run) few
    chunk = max(chunk, PYAV_RUN_FRAMES * runs)
    out = np.empty((len(idx), INPUT_H, INPUT_W, 3), dtype=np.uint8)
    for s in range(0, len(idx), chunk):
        out[s:s + chunk] = _pool_to_input(reader.get(idx[s:s + chunk], size=(DECODE_W, DECODE_H),
                                                     interpolation=PYAV_INTERPOLATION))
    return out


def _small_frames_in_processes(reader: PyAVReader, path: str, idx: List[int], runs: int) -> np.ndarray:
    """The frames `idx` (ascending) of the file at `path` decoded by `runs` worker processes (``pyav_runs.py``), each
    over one run of consecutive frames at 96x54 with decord's filter, and pooled here as their bytes arrive. Scaling a
    frame holds the GIL, so decoders in threads of this process would scale their frames one at a time."""
    out = np.empty((len(idx), INPUT_H, INPUT_W, 3), dtype=np.uint8)
    frame_bytes = DECODE_H * DECODE_W * 3
    threads = reader.num_threads or max(1, _cores_of_this_process() // runs)  # the cores the processes share
    workers = []
    try:
        for run in _split(range(len(idx)), runs):
            ask = pyav_runs.request(path, [reader.pts[idx[k]] for k in run], reader.keys, (DECODE_W, DECODE_H),
                                    PYAV_INTERPOLATION, threads)
            proc = subprocess.Popen([sys.executable, pyav_runs.__file__], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            workers.append((run.start, run.stop, proc))
            proc.stdin.write(ask)
            proc.stdin.close()

        def collect(a: int, b: int, proc: subprocess.Popen) -> None:
            for s in range(a, b, POOL_CHUNK_FRAMES):
                n = min(POOL_CHUNK_FRAMES, b - s)
                data = proc.stdout.read(n * frame_bytes)
                if len(data) < n * frame_bytes:
                    proc.wait()
                    why = proc.stderr.read().decode(errors='replace').strip() or f'exit status {proc.returncode}'
                    raise VideoDecodeError(f'cannot decode video {describe(path)}: {why}')
                out[s:s + n] = _pool_to_input(np.frombuffer(data, np.uint8).reshape(n, DECODE_H, DECODE_W, 3))

        _in_threads([lambda w=w: collect(*w) for w in workers])
    finally:
        for _, _, proc in workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
    return out


__all__ = ['decode_small_frames', 'open_small_reader', 'DECODE_H', 'DECODE_W']
