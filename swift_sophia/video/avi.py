"""Uncompressed AVI files (24-bit RGB frames, RIFF with an idx1 index), written with numpy and struct alone.

For machines without an encoder (no PyAV): decord, and PyAV where present, read them like any other video. Files are
large (width x height x 3 bytes a frame), so this suits generated test videos, not real footage.
"""
from __future__ import annotations

import struct

import numpy as np


def _chunk(fourcc: bytes, payload: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(payload)) + payload + (b"\0" if len(payload) % 2 else b"")


def _list(kind: bytes, payload: bytes) -> bytes:
    return _chunk(b"LIST", kind + payload)


def write_avi(path: str, frames: np.ndarray, fps: int = 8) -> None:
    """Write uint8 RGB frames [N, H, W, 3] as an uncompressed AVI (BI_RGB, bottom-up BGR rows padded to 4 bytes)."""
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[3] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be [N, H, W, 3] uint8 with N >= 1, got {frames.shape}")
    n, height, width, _ = frames.shape
    row = width * 3
    pad = (-row) % 4
    image_bytes = (row + pad) * height
    avih = struct.pack("<14I", 1_000_000 // fps, image_bytes * fps, 0, 0x10, n, 0, 1, image_bytes, width, height,
                       0, 0, 0, 0)
    strh = b"vids" + b"DIB " + struct.pack("<IHHIIIIIIiI", 0, 0, 0, 0, 1, fps, 0, n, image_bytes, -1, 0) \
        + struct.pack("<4h", 0, 0, width, height)
    strf = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, image_bytes, 0, 0, 0, 0)
    header = _list(b"hdrl", _chunk(b"avih", avih) + _list(b"strl", _chunk(b"strh", strh) + _chunk(b"strf", strf)))
    movi, index, offset = [], [], 4  # idx1 offsets count from the 'movi' fourcc
    for frame in frames:
        bgr = np.ascontiguousarray(frame[::-1, :, ::-1])  # bottom-up rows, BGR
        if pad:
            bgr = np.concatenate([bgr.reshape(height, row), np.zeros((height, pad), np.uint8)], axis=1)
        data = _chunk(b"00db", bgr.tobytes())
        index.append(struct.pack("<4sIII", b"00db", 0x10, offset, image_bytes))
        movi.append(data)
        offset += len(data)
    body = b"AVI " + header + _list(b"movi", b"".join(movi)) + _chunk(b"idx1", b"".join(index))
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)


__all__ = ["write_avi"]
