"""Video features kept for follow-up questions: a second question about the same video skips decoding, shot
detection and the vision tower, which do not depend on the question (pruning and the decoder do).

One cache per model instance, in host memory (pinned when there is a GPU), least recently used first out, bounded
by `SOPHIA_FEATURE_CACHE_GB` (GiB of features; default 8; 0 turns it off; `--model_kwargs
'{"sophia_feature_cache_gb": N}'` sets the same variable). Only inference uses it: the template looks the video up
before decoding (`swift infer`, interactive and batch, and `swift deploy` encode through it), and the model stores
what its vision tower computed for a video that missed.

A key names everything the features depend on: the video's content (BLAKE2b of its bytes, as the shot cache: a
changed file is a new key, a renamed or re-sent one the same), which frames are sampled (the sampling settings,
whose result is also stored and checked), the vision tower's input size, the feature dtype and the active adapter.
The model's weights are not in the key: the cache belongs to the model object, and `clear()` empties it (a weight
change in place, e.g. loading other weights into the same object, must call it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import List, Optional

import torch

CACHE_GB_ENV = "SOPHIA_FEATURE_CACHE_GB"
DEFAULT_CACHE_GB = 8.0


def cache_bytes_from_env() -> int:
    raw = os.environ.get(CACHE_GB_ENV, "").strip()
    try:
        gib = float(raw) if raw else DEFAULT_CACHE_GB
    except ValueError:
        gib = float("nan")
    if not gib >= 0:
        raise ValueError(f"{CACHE_GB_ENV}={raw!r} is not valid: it must be a number of GiB >= 0 (0: no cache)")
    return int(gib * 2**30)


def feature_key(content_hash: str, sampling: dict, image_size: int, dtype: torch.dtype, adapter=None) -> str:
    return json.dumps({"video": content_hash, "sampling": sampling, "size": image_size, "dtype": str(dtype),
                       "adapter": adapter}, sort_keys=True, separators=(",", ":"))


@dataclass
class VideoFeatures:
    """One video's entry: its sampled frames (native indices) and their features [F, M, D] (vision tower + projector,
    on the host in the cache); `frame_shots` [F] once shots were computed for it (pruning on); `descriptors` [F, D]
    (the pruner's per-frame descriptors) where the model computed them with the features."""
    indices: List[int]
    total_frames: int
    fps: float
    features: Optional[torch.Tensor] = None
    frame_shots: Optional[torch.Tensor] = None
    descriptors: Optional[torch.Tensor] = None
    copied: Optional["torch.cuda.Event"] = field(default=None, repr=False)  # the copy off the GPU is done

    @property
    def nbytes(self) -> int:
        return 0 if self.features is None else self.features.numel() * self.features.element_size()


@dataclass(eq=False)
class FeatureSlot:
    """What the template hands the model for one video (one object in the batch, so that moving the batch to the
    device leaves cached features on the host): the key (None when the cache is off), and the entry, whose features
    are set on a hit or when the template computed them while the video decoded (`fresh`)."""
    key: Optional[str]
    name: str
    entry: VideoFeatures = field(repr=False, default=None)
    fresh: bool = False  # features computed for this request while the video decoded (stored once its shots are known)

    @property
    def hit(self) -> bool:
        return self.entry is not None and self.entry.features is not None


class VideoFeatureCache:
    def __init__(self, max_bytes: Optional[int] = None):
        self.max_bytes = cache_bytes_from_env() if max_bytes is None else int(max_bytes)
        self._entries: "OrderedDict[str, VideoFeatures]" = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Optional[VideoFeatures]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        if entry.copied is not None:
            entry.copied.synchronize()
        return entry

    def put(self, key: str, entry: VideoFeatures) -> bool:
        """Store a copy of `entry` with its tensors in host memory (`entry` itself keeps its own where they are);
        False when it alone exceeds the bound."""
        if not self.enabled or entry.features is None or entry.nbytes > self.max_bytes:
            return False
        entry = dataclasses.replace(entry)
        entry.features, entry.copied = _to_host(entry.features)
        for name in ("frame_shots", "descriptors"):
            if getattr(entry, name) is not None:
                setattr(entry, name, getattr(entry, name).detach().to("cpu"))
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = entry
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                total -= old.nbytes
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _to_host(features: torch.Tensor):
    """(host tensor, CUDA event of its copy or None). Features already in pinned host memory (an hour's, which the
    model keeps there while pruning) are kept as they are when they are their buffer's only tensor; a GPU tensor is
    copied off asynchronously on the current stream (the copy is ordered before whatever reuses its memory)."""
    features = features.detach()
    if features.device.type == "cpu":
        whole = features.untyped_storage().nbytes() == features.numel() * features.element_size()
        return (features if features.is_pinned() and whole else features.clone()), None
    host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
    host.copy_(features, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


__all__ = ["VideoFeatureCache", "VideoFeatures", "FeatureSlot", "feature_key", "cache_bytes_from_env",
           "CACHE_GB_ENV"]
