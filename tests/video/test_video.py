"""Frame sampling settings (VIDEO_SEGMENTS / FPS / FPS_MIN_FRAMES / FPS_MAX_FRAMES), decoding, the PyAV fallback."""
import io

import numpy as np
import pytest

from clips import PALETTE, write_clip
from swift_sophia.video import frames as V
from swift_sophia.video.source import VideoDecodeError, VideoNotFoundError, resolve_video_source

_VARS = ("VIDEO_SEGMENTS", "FPS", "FPS_MIN_FRAMES", "FPS_MAX_FRAMES")


@pytest.fixture()
def env(monkeypatch):
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)

    def set_(**kw):
        for k, v in kw.items():
            if v is None:
                monkeypatch.delenv(k, raising=False)
            else:
                monkeypatch.setenv(k, str(v))
    return set_


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """100 frames at 25 fps (4 s): shots of 40 / 60 frames."""
    return write_clip(tmp_path_factory.mktemp("v") / "clip.mp4", [40, 60], size=(64, 48))


def test_precedence_and_counts(env):
    assert V.FrameSampling.from_env(32) == V.FrameSampling(num_frames=32)  # nothing set: the config's num_frames
    env(FPS=1, FPS_MAX_FRAMES=4096)
    s = V.FrameSampling.from_env(32)
    assert (s.num_frames, s.fps, s.min_frames, s.max_frames) == (None, 1.0, 4, 4096)
    hour = 30 * 3600
    assert s.count(hour, 30.0) == 3600  # an hour at 1 fps
    assert s.count(2 * hour, 30.0) == 4096  # two hours: capped
    assert s.count(30 * 2, 30.0) == 4  # two seconds: FPS_MIN_FRAMES
    assert s.count(3, 30.0) == 3  # never more frames than the video has
    assert s.count(1000, 0.0) == 1000  # no frame rate: FPS_MAX_FRAMES (capped at the video)
    env(FPS=2, FPS_MAX_FRAMES=None)  # ms-swift's defaults for the bounds
    s = V.FrameSampling.from_env(32)
    assert (s.min_frames, s.max_frames) == (V.DEFAULT_FPS_MIN_FRAMES, V.DEFAULT_FPS_MAX_FRAMES) == (4, 768)
    assert s.count(25 * 100, 25.0) == 200
    env(FPS_MIN_FRAMES=16)
    assert V.FrameSampling.from_env(32).count(25 * 2, 25.0) == 16
    env(VIDEO_SEGMENTS=7)  # an explicit VIDEO_SEGMENTS wins over FPS
    assert V.FrameSampling.from_env(32) == V.FrameSampling(num_frames=7)
    assert V.FrameSampling.from_env(32).count(10 ** 6, 30.0) == 7


@pytest.mark.parametrize("name,value", [("VIDEO_SEGMENTS", "abc"), ("VIDEO_SEGMENTS", "0"), ("VIDEO_SEGMENTS", "2.5"),
                                        ("FPS", "-1"), ("FPS", "0"), ("FPS", "fast"), ("FPS", "nan"),
                                        ("FPS_MAX_FRAMES", "many"), ("FPS_MIN_FRAMES", "0")])
def test_bad_values_name_the_variable(env, name, value):
    if name.startswith("FPS_"):
        env(FPS=1)
    env(**{name: value})
    with pytest.raises(ValueError, match=f"{name}='{value}'"):
        V.FrameSampling.from_env(32)


def test_max_below_min_is_an_error(env):
    env(FPS=1, FPS_MIN_FRAMES=10, FPS_MAX_FRAMES=5)
    with pytest.raises(ValueError, match="FPS_MAX_FRAMES=5 is below FPS_MIN_FRAMES=10"):
        V.FrameSampling.from_env(32)


def test_load_video_by_rate(clip):
    c = V.load_video(clip, V.FrameSampling(num_frames=None, fps=2.5))  # 4 s at 2.5 fps: 10 frames
    assert c.indices == V.sample_frame_indices(100, 10) and c.frames.shape == (10, 48, 64, 3)
    assert (c.total_frames, c.fps) == (100, 25.0)
    c = V.load_video(clip, 5, size=32)  # straight to the vision input size
    assert c.frames.shape == (5, 32, 32, 3)
    assert np.abs(c.frames[0].reshape(-1, 3).mean(0) - PALETTE[0]).max() < 12


def test_frames_at_the_vision_size_are_resized_a_chunk_at_a_time(clip, monkeypatch):
    """load_video(size=S): full-size frames resized with torch's antialiased bicubic, chunk by chunk (bounded
    memory), the same bits as resizing all frames at once, and the same whichever decoder read the file."""
    whole = V.load_video(clip, 9)
    expected = V.resize_frames(whole.frames, (32, 32), mode="bicubic")
    monkeypatch.setattr(V, "RESIZE_CHUNK_FRAMES", 4)
    chunked = V.load_video(clip, 9, size=32)
    np.testing.assert_array_equal(chunked.frames, expected)
    decord = V.decode_resized(V.open_reader(clip, backend="decord"), whole.indices, (32, 32))
    np.testing.assert_array_equal(decord, expected)


def test_large_frames_are_decoded_fewer_at_a_time_with_the_same_bits(clip, monkeypatch):
    """A chunk holds at most RESIZE_CHUNK_BYTES of full-size RGB (64 frames up to 1080p, 16 of 4K, 4 of 8K: 64 8K
    frames were 6.4 GB at a time); the frames the model sees are the same whatever the chunk."""
    sizes = ((640, 360), (1920, 1080), (3840, 2160), (7680, 4320), (30000, 30000))
    assert [V.resize_chunk_frames(w, h) for w, h in sizes] == [64, 64, 16, 4, 1]
    whole = V.load_video(clip, 9, size=32)
    decoded = []
    decode_frames = V.decode_frames
    monkeypatch.setattr(V, "decode_frames", lambda reader, idx, *a, **k: decoded.append(len(idx)) or
                        decode_frames(reader, idx, *a, **k))
    monkeypatch.setattr(V, "RESIZE_CHUNK_BYTES", 2 * 64 * 48 * 3)  # two frames of the 64x48 clip
    np.testing.assert_array_equal(V.load_video(clip, 9, size=32).frames, whole.frames)
    assert decoded == [2, 2, 2, 2, 1]


def test_pyav_frames_equal_decord_frames(clip):
    """The two decoders number and decode frames identically (the shot cache and older releases used decord)."""
    pyav, decord = V.open_reader(clip, backend="pyav"), V.open_reader(clip, backend="decord")
    assert len(pyav) == len(decord) == 100 and pyav.fps == decord.fps == 25.0
    for idx in ([0, 1, 2], [5, 50, 99], [99, 3, 3, 60], V.sample_frame_indices(100, 7)):
        np.testing.assert_array_equal(pyav.get(idx), decord.get(idx))
    with pytest.raises(IndexError):
        pyav.get([100])


def test_video_decord_cannot_decode_is_decoded_with_pyav(tmp_path):
    """decord opens a 72-pixel-wide video but fails on its frames ("DECORDArrayCopyFromTo"); PyAV decodes it."""
    path = write_clip(tmp_path / "narrow.mp4", [10, 10], size=(72, 128))
    decord = V.open_reader(path, backend="decord")
    with pytest.raises(Exception):
        decord.get([0])
    np.testing.assert_array_equal(V.decode_frames(decord, [0, 15], src=path), V.PyAVReader(path).get([0, 15]))
    c = V.load_video(path, 4)
    assert c.frames.shape == (4, 128, 72, 3) and c.indices == [2, 7, 12, 17]
    assert np.abs(c.frames[0].reshape(-1, 3).mean(0) - PALETTE[0]).max() < 12
    assert np.abs(c.frames[-1].reshape(-1, 3).mean(0) - PALETTE[1]).max() < 12


def test_sources_resolve_in_one_place(clip, tmp_path, monkeypatch):
    data = open(clip, "rb").read()
    for src in (clip, data, io.BytesIO(data), {"bytes": data}, {"path": clip}):
        resolved, _ = resolve_video_source(src)
        assert len(V.open_reader(resolved)) == 100
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VideoNotFoundError, match="video file not found: nope.mp4"):
        resolve_video_source("nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 100)
    with pytest.raises(VideoDecodeError, match="cannot decode video .*bad.mp4"):
        V.load_video(str(bad), 4)


def test_pixel_values_are_converted_in_chunks_to_the_model_dtype():
    """Frame by frame the same values as one conversion in float32, but never a float32 copy of every frame."""
    import torch

    from swift_sophia.video.frames import frames_to_pixel_values

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(7, 40, 56, 3), dtype=np.uint8)
    whole = frames_to_pixel_values(frames, 28, chunk=7)
    chunked = frames_to_pixel_values(frames, 28, chunk=3)
    assert torch.equal(chunked, whole)
    half = frames_to_pixel_values(frames, 28, torch.bfloat16, chunk=2)
    assert half.dtype == torch.bfloat16 and torch.equal(half, whole.to(torch.bfloat16))


@pytest.mark.parametrize("source", ["path", "bytes", "BytesIO"])
def test_several_decoders_at_once_give_the_same_frames(clip, monkeypatch, source):
    """SOPHIA_DECODE_SEGMENTS / segments: runs of consecutive wanted frames decoded by decoders of their own in
    threads (each run from the keyframe before it); the frames are those one decoder gives, at full size, scaled,
    and at the vision tower's size chunk by chunk."""
    import threading

    data = open(clip, "rb").read()
    src = {"path": clip, "bytes": data, "BytesIO": io.BytesIO(data)}[source]
    monkeypatch.setattr(V, "SEGMENT_MIN_FRAMES", 4)
    threads = set()
    run = V.PyAVReader._decode_run
    monkeypatch.setattr(V.PyAVReader, "_decode_run", lambda self, *a: threads.add(threading.get_ident()) or
                        run(self, *a))
    idx = V.sample_frame_indices(100, 37) + [99, 3, 3, 60]
    one = V.PyAVReader(src, segments=1)
    full, small = one.get(idx), one.get(idx, (24, 16))
    for segments in (2, 3, 5):
        threads.clear()
        many = V.PyAVReader(src, segments=segments)
        np.testing.assert_array_equal(many.get(idx), full)
        np.testing.assert_array_equal(many.get(idx, (24, 16)), small)
        assert len(threads) > 1
    monkeypatch.setattr(V, "RESIZE_CHUNK_FRAMES", 4)
    monkeypatch.setenv("SOPHIA_DECODE_SEGMENTS", "1")
    expected = V.decode_resized(V.PyAVReader(src), idx, (32, 32))
    monkeypatch.setenv("SOPHIA_DECODE_SEGMENTS", "3")
    threads.clear()
    np.testing.assert_array_equal(V.decode_resized(V.PyAVReader(src), idx, (32, 32)), expected)
    assert len(threads) == 3


def test_decode_segments_setting(monkeypatch):
    monkeypatch.setenv("SOPHIA_DECODE_SEGMENTS", "4")
    assert [V.decode_segments(n) for n in (10, 64, 200, 10_000)] == [1, 1, 3, 4]
    monkeypatch.setenv("SOPHIA_DECODE_SEGMENTS", "many")
    with pytest.raises(ValueError, match="SOPHIA_DECODE_SEGMENTS='many' is not valid"):
        V.decode_segments(1000)
