"""Synthetic clips: shots of a plain background colour with one coloured shape that drifts a little, rendered as
frames and written as real H.264 mp4 files (PyAV). The synthetic datasets (`sophia make-data`,
`sophia synthetic-shots`) and the needle-in-a-haystack's generated haystack are made of them.
"""
from __future__ import annotations

import random
from typing import Dict, List, Optional

import numpy as np

COLORS: Dict[str, tuple] = {
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220),
    "yellow": (235, 220, 40), "purple": (140, 50, 170), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if shape == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
    if shape == "square":
        return (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
    # triangle pointing up
    return (yy <= cy + radius) & (yy >= cy - radius) & (np.abs(xx - cx) <= (yy - (cy - radius)) / 2)


def render_clip(shots: List[dict], frames_per_shot: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [F, size, size, 3]: every shot `frames_per_shot` frames of its background and moving shape."""
    rng = np.random.default_rng(seed)
    frames = []
    for shot in shots:
        bg = np.array(COLORS[shot["background"]], dtype=np.float32)
        fg = np.array(COLORS[shot["foreground"]], dtype=np.float32)
        x0, y0 = rng.uniform(0.35, 0.65, size=2) * size
        dx, dy = rng.uniform(-1.0, 1.0, size=2)
        for t in range(frames_per_shot):
            img = np.broadcast_to(bg, (size, size, 3)).copy()
            mask = _shape_mask(shot["shape"], size, x0 + dx * t, y0 + dy * t, size * 0.2)
            img[mask] = fg
            img += rng.normal(0.0, 4.0, size=img.shape)
            frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_mp4(path: str, frames: np.ndarray, fps: int = 8) -> None:
    import av

    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "g": str(fps)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def random_clip_spec(rng: random.Random, num_shots: Optional[int] = None) -> List[dict]:
    n = num_shots or rng.randint(2, 4)
    names = list(COLORS)
    shots, prev = [], None
    for _ in range(n):
        bg = rng.choice([c for c in names if c != prev])
        fg = rng.choice([c for c in names if c != bg])
        shots.append({"background": bg, "foreground": fg, "shape": rng.choice(SHAPES)})
        prev = bg
    return shots


__all__ = ["COLORS", "SHAPES", "render_clip", "write_mp4", "random_clip_spec"]
