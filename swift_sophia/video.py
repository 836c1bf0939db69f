"""Video loading for Sophia: decord through ms-swift's `load_file` (paths, URLs, base64 and data URLs).

Frames are sampled uniformly at segment centres (InternVL's rule), resized to the vision tower's input size
and normalised with the ImageNet statistics InternViT was trained with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from io import BytesIO
from typing import List, Sequence, Union

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".flv", ".mpeg", ".mpg", ".ts")


class VideoError(ValueError):
    """A video that cannot be used, with the reason and the video's name in the message."""


@dataclass
class VideoClip:
    frames: np.ndarray  # uint8 [F, H, W, 3], the sampled frames
    indices: List[int]  # their indices in the video
    total_frames: int
    fps: float
    source: Union[str, BytesIO]  # what decord read (a path, or the bytes of a URL / base64 video)
    name: str  # for messages


def sample_frame_indices(total_frames: int, num_frames: int) -> List[int]:
    """Uniform segment-centre sampling; every frame once when the video has no more than `num_frames`."""
    if total_frames <= 0:
        raise VideoError("the video has no frames")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if total_frames <= num_frames:
        return list(range(total_frames))
    seg = total_frames / num_frames
    return [min(total_frames - 1, max(0, int(round((i + 0.5) * seg - 0.5)))) for i in range(num_frames)]


def describe(video) -> str:
    """A short, printable name for a video given as a path, URL, data URL or base64 string."""
    if isinstance(video, str):
        v = video.strip()
        if v.startswith("data:"):
            return f"<data URL, {len(v)} chars>"
        if len(v) > 200 and not os.path.exists(v):
            return f"<base64 video, {len(v)} chars>"
        return v
    return f"<{type(video).__name__}>"


def open_video(video):
    """Resolve a path, URL, data URL or base64 string into something decord reads; missing files fail clearly."""
    from swift.template.vision_utils import load_file

    name = describe(video)
    if isinstance(video, str):
        v = video.strip()
        looks_like_path = (not v.startswith(("http://", "https://", "data:"))
                           and (v.lower().endswith(_VIDEO_EXTENSIONS) or os.sep in v) and len(v) < 4096)
        if looks_like_path:
            if not os.path.isfile(v):
                raise VideoError(f"video file not found: {v}")
            return v, name
    try:
        return load_file(video), name
    except Exception as exc:  # bad base64, unreachable URL, ...
        raise VideoError(f"cannot read video {name}: {exc}") from exc


def load_video(video, num_frames: int) -> VideoClip:
    """Decode `num_frames` uniformly sampled frames. Raises `VideoError` naming the video on any problem."""
    from decord import DECORDError, VideoReader, cpu

    source, name = open_video(video)
    try:
        reader = VideoReader(source, ctx=cpu(0), num_threads=1)
        total = len(reader)
    except (DECORDError, RuntimeError, ValueError) as exc:
        raise VideoError(f"cannot decode video {name}: not a readable video file ({str(exc).splitlines()[0]})") \
            from exc
    if total == 0:
        raise VideoError(f"video {name} has zero frames")
    indices = sample_frame_indices(total, num_frames)
    try:
        frames = reader.get_batch(indices).asnumpy()
    except (DECORDError, RuntimeError) as exc:
        raise VideoError(f"cannot decode frames {indices[0]}..{indices[-1]} of video {name}: {exc}") from exc
    fps = float(reader.get_avg_fps() or 0.0)
    if isinstance(source, BytesIO):
        source.seek(0)
    return VideoClip(frames=frames, indices=indices, total_frames=total, fps=fps, source=source, name=name)


def frames_to_pixel_values(frames: Union[np.ndarray, Sequence], image_size: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] (or a list of PIL images) -> float [F, 3, S, S], resized and ImageNet-normalised."""
    if not isinstance(frames, np.ndarray):
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False,
                                            antialias=True).clamp_(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


__all__ = ["VideoClip", "VideoError", "sample_frame_indices", "load_video", "frames_to_pixel_values", "describe"]
