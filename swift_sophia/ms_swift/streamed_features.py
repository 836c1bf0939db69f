"""A video's features computed while it decodes: the template's path at inference on a GPU (and what
`benchmarks/bench_8b.py --e2e` times). Imports nothing of ms-swift, so the benchmark runs it where ms-swift is not
installed."""
from __future__ import annotations

from ..video.frames import frames_to_pixel_values, load_video


def load_video_features(model, video, sampling, size: int, on_indices=None):
    """`load_video` with each decoded chunk of frames sent through `model`'s vision tower at once (its
    `video_feature_writer`), while the next chunks decode: (the clip, without frames; (features, descriptors) as the
    model lays them out). `on_indices` as `load_video`'s."""
    writers = []

    def begin(src, indices, total):
        writers.append(model.video_feature_writer(len(indices)))
        if on_indices is not None:
            on_indices(src, indices, total)

    def on_frames(start, frames):
        writer = writers[0]
        writer.add(start, frames_to_pixel_values(frames, size, writer.dtype, device=writer.device))

    clip = load_video(video, sampling, size=size, on_indices=begin, on_frames=on_frames)
    return clip, writers[0].result()


__all__ = ["load_video_features"]
