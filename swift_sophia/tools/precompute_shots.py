"""Precompute the shot boundaries of every video of one or more ms-swift dataset files.

    sophia precompute-shots train.jsonl [val.jsonl ...] --workers 2

Rows are ms-swift rows with a ``videos`` list (or a single ``video``/``videos`` string); relative paths are
looked up next to the jsonl file first, then in the current folder and ``$ROOT_IMAGE_DIR``. Every distinct
video is processed once (a video used by several rows is detected once), by ``--workers`` processes (``0``: in
this process), ``--batch-videos`` videos per detector call (default 1 on CPU, 8 with ``--device cuda``: the
windows of short clips then fill the GPU batches). Videos whose entry is already in the cache are skipped,
entries are written atomically, so the command can be interrupted (Ctrl-C, kill) and rerun: it continues where
it stopped.

A missing or undecodable video is reported with the file, row number (1-based line) and path, the rest goes
on, and the exit code is 1 (0 when every video is cached; 130 when interrupted). The detector sees every frame:
one entry per video serves every sampling (``VIDEO_SEGMENTS``, ``FPS``, any ``--num-frames``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..video.shot_cache import ShotCache
from ..video.shots import DETECTION_MODE, DetectionSettings
from ..video.source import resolve_video_source


@dataclass
class Job:
    source: str  # resolved absolute path
    rows: List[Tuple[str, int]] = field(default_factory=list)  # (jsonl, 1-based line) using it


def _row_videos(row) -> list:
    videos = row.get('videos', row.get('video'))
    if videos is None:
        return []
    if isinstance(videos, (str, dict)):
        return [videos]
    return list(videos)


def collect_jobs(files: Sequence[str]) -> Tuple[Dict[str, Job], List[str], int]:
    """Read the dataset files. Returns (jobs by video path, error lines, number of rows)."""
    jobs: Dict[str, Job] = {}
    errors: List[str] = []
    nrows = 0
    for fn in files:
        base = os.path.dirname(os.path.abspath(fn))
        try:
            f = open(fn, 'r', encoding='utf-8')
        except OSError as e:
            errors.append(f'{fn}: cannot open: {e}')
            continue
        with f:
            if fn.endswith('.json'):
                try:
                    data = json.load(f)
                    rows = [(i + 1, r) for i, r in enumerate(data if isinstance(data, list) else [data])]
                except ValueError as e:
                    errors.append(f'{fn}: invalid JSON: {e}')
                    continue
            else:
                rows = []
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append((lineno, json.loads(line)))
                    except ValueError as e:
                        errors.append(f'{fn}:{lineno}: invalid JSON: {e}')
            for lineno, row in rows:
                nrows += 1
                if not isinstance(row, dict):
                    errors.append(f'{fn}:{lineno}: row is not a JSON object')
                    continue
                for video in _row_videos(row):
                    if isinstance(video, (list, tuple)):
                        continue  # frames given as images: nothing to detect
                    try:
                        src, _ = resolve_video_source(video, base, prefer_base=True)
                    except (FileNotFoundError, ValueError) as e:
                        errors.append(f'{fn}:{lineno}: {e}')
                        continue
                    if not isinstance(src, str):
                        errors.append(f'{fn}:{lineno}: {str(video)[:80]!r}: only local files are precomputed')
                        continue
                    jobs.setdefault(src, Job(src)).rows.append((fn, lineno))
    return jobs, errors, nrows


# ------------------------------------------------------------------------------------------------- workers
_W: dict = {}


def _init_worker(cache_dir: Optional[str], settings: DetectionSettings, device: str, threads: int,
                 ignore_sigint: bool) -> None:
    if ignore_sigint:  # the parent handles Ctrl-C and cancels; the worker finishes or is terminated
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch
    torch.set_num_threads(max(1, threads))
    from ..video.shot_detector import ShotDetector
    _W.update(cache=ShotCache(cache_dir), settings=settings, detector=ShotDetector(device))


def _process(paths: List[str]) -> List[Tuple[str, str, float]]:
    """-> [(path, 'cached' | 'computed' | 'error: ...', seconds)] for a batch of videos."""
    from ..video.shots import ensure_cached_many
    t0 = time.perf_counter()
    try:
        res = ensure_cached_many(paths, cache=_W['cache'], detector=_W['detector'], settings=_W['settings'],
                                 num_threads=1)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the batched detector call failed: every video of the batch fails
        res = [e] * len(paths)
    status = [f'error: {type(r).__name__}: {r}' if isinstance(r, BaseException) else r for r in res]
    dt = (time.perf_counter() - t0) / max(1, len(paths))
    return [(p, st, dt) for p, st in zip(paths, status)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog='sophia precompute-shots', description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('datasets', nargs='+', help='ms-swift dataset files (.jsonl or .json)')
    ap.add_argument('--num-frames', type=int, default=None,
                    help='ignored (kept for old command lines): one entry per video serves every sampling')
    ap.add_argument('--workers', type=int, default=max(1, min(4, os.cpu_count() or 1)),
                    help='worker processes (0: run in this process)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads per worker (default cores/workers)')
    ap.add_argument('--cache-dir', default=None, help='default $SOPHIA_SHOT_CACHE or ~/.cache/swift_sophia/shots')
    ap.add_argument('--device', default=os.environ.get('SOPHIA_SHOT_DEVICE', 'cpu'), help='cpu, cuda, auto')
    ap.add_argument('--mode', choices=[DETECTION_MODE], default=None,
                    help='which frames the detector sees: only native (every frame) is left')
    ap.add_argument('--threshold', type=float, default=None)
    ap.add_argument('--batch-videos', type=int, default=None,
                    help='videos per detector call (their windows share batches; default 1 on CPU, 8 on CUDA)')
    ap.add_argument('--no-progress', action='store_true')
    args = ap.parse_args(argv)

    from tqdm import tqdm

    settings = DetectionSettings.from_env(threshold=args.threshold)
    cache = ShotCache(args.cache_dir)
    cache.clean_temporaries()
    jobs, errors, nrows = collect_jobs(args.datasets)
    for e in errors:
        print(f'error: {e}', file=sys.stderr)
    print(f'{nrows} rows, {len(jobs)} distinct videos, cache {cache.root}, detector sees every frame',
          file=sys.stderr)
    workers = max(0, args.workers)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    counts: Dict[str, int] = defaultdict(int)
    failed_rows = len(errors)
    pbar = tqdm(total=len(jobs), unit='video', desc='shots', disable=args.no_progress, file=sys.stderr)

    def record(path: str, status: str, seconds: float) -> None:
        nonlocal failed_rows
        if status.startswith('error'):
            counts['failed'] += 1
            for fn, lineno in jobs[path].rows:
                failed_rows += 1
                tqdm.write(f'error: {fn}:{lineno}: {path}: {status[7:]}', file=sys.stderr)
        else:
            counts[status] += 1
        pbar.update(1)
        pbar.set_postfix(computed=counts['computed'], cached=counts['cached'], failed=counts['failed'])

    interrupted = False
    bv = args.batch_videos or (8 if args.device.startswith('cuda') else 1)
    paths = list(jobs)
    batches = [paths[i:i + bv] for i in range(0, len(paths), bv)]
    try:
        if workers == 0:
            _init_worker(args.cache_dir, settings, args.device, threads, ignore_sigint=False)
            for batch in batches:
                for r in _process(batch):
                    record(*r)
        else:
            import multiprocessing as mp
            ctx = mp.get_context('spawn')
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(args.cache_dir, settings, args.device, threads, True)) as pool:
                pending: Dict[Future, List[str]] = {}
                it = iter(batches)
                try:
                    for b in it:  # keep at most 2 tasks per worker queued, so Ctrl-C stops quickly
                        pending[pool.submit(_process, b)] = b
                        if len(pending) >= 2 * workers:
                            break
                    while pending:
                        done, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done:
                            batch = pending.pop(fut)
                            try:
                                for r in fut.result():
                                    record(*r)
                            except Exception as e:  # a worker died
                                for path in batch:
                                    record(path, f'error: worker failed: {type(e).__name__}: {e}', 0.0)
                            nxt = next(it, None)
                            if nxt is not None:
                                pending[pool.submit(_process, nxt)] = nxt
                except KeyboardInterrupt:
                    for fut in pending:
                        fut.cancel()
                    for proc in list(getattr(pool, '_processes', {}).values()):
                        proc.terminate()  # cache entries are atomic: a killed worker leaves no partial entry
                    raise
    except KeyboardInterrupt:
        interrupted = True
    finally:
        pbar.close()
    done = counts['computed'] + counts['cached'] + counts['failed']
    print(f"\nsummary: {len(jobs)} videos: {counts['computed']} computed, {counts['cached']} already cached, "
          f"{counts['failed']} failed, {len(jobs) - done} not processed; {failed_rows} row error(s)",
          file=sys.stderr)
    if interrupted:
        print('interrupted: rerun the same command to finish (finished videos are skipped)', file=sys.stderr)
        return 130
    return 1 if failed_rows or counts['failed'] else 0
