"""Shot-boundary arithmetic (no decoding, no network): transition probabilities -> cut frames -> shots over
the sampled frames, half-open ranges of sampled-frame positions ``[(0, b1), (b1, b2), ..., (b_{s-1}, F)]``;
a single shot falls back to ``ceil(F / 8)`` uniform segments."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

Shot = Tuple[int, int]

DEFAULT_THRESHOLD = 0.5
FALLBACK_SEGMENT_FRAMES = 8  # no cut -> ceil(F / 8) uniform segments


def probabilities_to_cuts(probs: Sequence[float], threshold: float = DEFAULT_THRESHOLD) -> List[int]:
    """Frame indices where a new shot starts.

    TransNetV2 marks a hard cut by a high probability on the last frame of the outgoing shot, and a gradual
    transition by a run of frames. A run of positive frames ``[a, b]`` yields one cut at
    ``(a + b + 2) // 2``: ``a + 1`` for a one-frame run (the frame after the marked one, the same split as
    ``TransNetV2.predictions_to_scenes``), the middle of the transition otherwise. A run that starts at frame
    0 or reaches the last frame starts no new shot.
    """
    p = np.asarray(probs, dtype=np.float32) > threshold
    cuts = []
    n = len(p)
    i = 0
    while i < n:
        if not p[i]:
            i += 1
            continue
        a = i
        while i + 1 < n and p[i + 1]:
            i += 1
        b = i
        if a > 0 and b < n - 1:
            cuts.append((a + b + 2) // 2)
        i += 1
    return cuts


def detection_cuts_to_native(cuts: Sequence[int], detect_indices: Sequence[int]) -> List[int]:
    """Convert cuts in detection-frame positions into native frame numbers.

    A cut at detection position ``c`` means the true cut lies in ``(d[c-1], d[c]]``; it is placed at the
    midpoint ``(d[c-1] + d[c] + 1) // 2`` (exact when the detector saw every frame).
    """
    d = list(detect_indices)
    return sorted({(d[c - 1] + d[c] + 1) // 2 for c in cuts if 0 < c < len(d)})


def uniform_segments(num_frames: int, num_segments: int) -> List[Shot]:
    """``num_segments`` contiguous, non-empty, near-equal ranges covering ``0..num_frames`` (clipped to
    ``[1, num_frames]`` segments). Boundaries are ``floor(i * F / S)``."""
    if num_frames <= 0:
        return []
    s = max(1, min(int(num_segments), num_frames))
    b = [(i * num_frames) // s for i in range(s + 1)]
    return [(b[i], b[i + 1]) for i in range(s)]


def default_fallback_segments(num_frames: int) -> int:
    """Number of uniform segments used when no cut is detected: ``ceil(F / 8)`` (1 for F <= 8)."""
    return max(1, math.ceil(num_frames / FALLBACK_SEGMENT_FRAMES))


def cuts_to_sampled_shots(native_cuts: Sequence[int], frame_indices: Sequence[int]) -> List[Shot]:
    """Shots over the sampled frames from cuts in native frame numbers.

    Sampled frame ``j`` (native index ``x_j``) belongs to the shot opened by the last cut ``<= x_j``; shots
    are the maximal runs of sampled positions with the same shot. Several cuts between two consecutive
    sampled frames give one boundary; shots with no sampled frame vanish. No fallback is applied here.
    """
    x = np.asarray(frame_indices, dtype=np.int64)
    f = len(x)
    if f == 0:
        return []
    pos = np.searchsorted(x, np.asarray(sorted(native_cuts), dtype=np.int64), side='left')
    bounds = sorted({int(v) for v in pos if 0 < v < f})
    edges = [0] + bounds + [f]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def validate_shots(shots: Sequence[Shot], num_frames: int) -> None:
    """Raise ``ValueError`` unless ``shots`` are non-empty half-open ranges tiling ``0..num_frames``."""
    if num_frames <= 0:
        if shots:
            raise ValueError('shots given for zero frames')
        return
    if not shots or shots[0][0] != 0 or shots[-1][1] != num_frames:
        raise ValueError(f'shots {list(shots)} do not cover 0..{num_frames}')
    for (a, b), (c, _) in zip(shots, list(shots[1:]) + [(num_frames, None)]):
        if not (a < b and b == c):
            raise ValueError(f'shots {list(shots)} are not contiguous non-empty ranges')


def shots_from_entry(entry: Dict[str, Any], frame_indices: Sequence[int],
                     fallback_segments: Optional[int] = None) -> List[Shot]:
    """Shots over the sampled frames from a cache entry (``{'cuts': native cut frames, ...}``), with the
    uniform fallback when fewer than two shots remain."""
    f = len(frame_indices)
    if f == 0:
        return []
    if f == 1:
        return [(0, 1)]
    shots = cuts_to_sampled_shots(entry['cuts'], frame_indices)
    if len(shots) < 2:
        n = fallback_segments if fallback_segments is not None else default_fallback_segments(f)
        shots = uniform_segments(f, n)
    return shots


__all__ = ['Shot', 'DEFAULT_THRESHOLD', 'FALLBACK_SEGMENT_FRAMES', 'probabilities_to_cuts', 'detection_cuts_to_native',
           'uniform_segments', 'default_fallback_segments', 'cuts_to_sampled_shots', 'validate_shots',
           'shots_from_entry']
