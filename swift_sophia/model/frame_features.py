"""A video's frame features (vision tower + pixel shuffle + projector, [F, M, D]) written a chunk of frames at a
time, in any order: what `SophiaModel` computes from all the pixels at once, for pixels that arrive while the rest of
the video still decodes (the template streams them at inference, so that the vision tower runs beside the decoders).

Where the features go follows the model's rule (`SophiaModel._features_on_host`): on the device, or, for an hour's
worth with pruning on, in pinned host memory with the pruner's per-frame descriptors ([F, D] float32) on the device,
which is all the pruner needs before it picks the frames to bring back.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


class FrameFeatureWriter:
    def __init__(self, model, frames: int, dtype: torch.dtype, on_host: bool):
        self.model, self.frames, self.dtype, self.on_host = model, int(frames), dtype, on_host
        self.device = next(model.vision_tower.parameters()).device
        self.features: Optional[torch.Tensor] = None
        self.descriptors: Optional[torch.Tensor] = None
        self.written = 0

    def add(self, start: int, pixels: torch.Tensor) -> None:
        """The features of frames `start .. start + len(pixels)`, `vision_chunk_frames` at a time."""
        chunk = self.model.config.vision_chunk_frames or pixels.shape[0]
        with torch.no_grad():
            for s in range(0, pixels.shape[0], chunk):
                features = self.model._frame_features(pixels[s:s + chunk].to(self.device)).to(self.dtype)
                self._write(start + s, features)

    def _write(self, start: int, features: torch.Tensor) -> None:
        end = start + features.shape[0]
        if end > self.frames:
            raise IndexError(f"frames {start}..{end - 1} written to the features of a {self.frames}-frame video")
        if self.features is None:
            shape = (self.frames,) + tuple(features.shape[1:])
            if self.on_host:
                self.features = torch.empty(shape, dtype=self.dtype, device="cpu",
                                            pin_memory=torch.cuda.is_available())
                self.descriptors = torch.empty(self.frames, features.shape[-1], dtype=torch.float32,
                                               device=features.device)
            else:
                self.features = torch.empty(shape, dtype=self.dtype, device=features.device)
        if self.on_host:
            self.descriptors[start:end] = self.model.pruner.frame_descriptors(features)
            # ordered before any reuse of `features`' memory (same stream); `result` waits for the last copies
            self.features[start:end].copy_(features, non_blocking=True)
        else:
            self.features[start:end] = features
        self.written += features.shape[0]

    def result(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(features [F, M, D], descriptors [F, D] when in host memory, else None), once every frame is written."""
        if self.written != self.frames:
            raise RuntimeError(f"{self.written} of {self.frames} frames' features were written")
        if self.on_host and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return self.features, self.descriptors


__all__ = ["FrameFeatureWriter"]
