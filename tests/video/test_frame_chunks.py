"""Frames a chunk at a time as they decode (`iter_resized`, `load_video(on_frames=...)`): what the template streams
through the vision tower. Every frame once, with the bits `decode_resized` gives; a decoder's error names the video
and stops the other decoders; the consumer's own error passes through unchanged."""
import threading

import numpy as np
import pytest

from clips import write_clip
from swift_sophia.video import frames as V
from swift_sophia.video.source import VideoDecodeError


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("chunks") / "clip.mp4", [30, 50], size=(64, 48))


@pytest.fixture()
def small_chunks(monkeypatch):
    """Chunks of 4 frames and runs of at least 4, so that 80 frames make many chunks over 3 decoders."""
    monkeypatch.setattr(V, "RESIZE_CHUNK_FRAMES", 4)
    monkeypatch.setattr(V, "SEGMENT_MIN_FRAMES", 4)
    monkeypatch.setenv("SOPHIA_DECODE_SEGMENTS", "3")


def test_chunks_cover_every_frame_once_with_decode_resized_bits(clip, small_chunks, monkeypatch):
    idx = V.sample_frame_indices(80, 37)
    threads = set()
    get = V.PyAVReader.get
    monkeypatch.setattr(V.PyAVReader, "get", lambda self, *a, **k: threads.add(threading.get_ident()) or
                        get(self, *a, **k))
    chunks = list(V.iter_resized(V.PyAVReader(clip), idx, (32, 32)))
    assert len(threads) == 3  # three decoders at once
    starts = [start for start, _ in chunks]
    assert sorted(starts) == list(range(0, 37, 4))  # chunk k holds positions 4k .. 4k + 3, whatever the decoder
    out = np.empty((37, 32, 32, 3), np.uint8)
    for start, part in chunks:
        out[start:start + len(part)] = part
    monkeypatch.setenv("SOPHIA_DECODE_SEGMENTS", "1")
    np.testing.assert_array_equal(out, V.decode_resized(V.PyAVReader(clip), idx, (32, 32)))


def test_load_video_hands_over_chunks_and_keeps_no_frames(clip, small_chunks):
    seen = np.zeros((16, 32, 32, 3), np.uint8)
    got = []

    def on_frames(start, frames):
        assert threading.current_thread() is threading.main_thread()  # the caller's thread, not a decoder's
        seen[start:start + len(frames)] = frames
        got.append(start)

    streamed = V.load_video(clip, 16, size=32, on_frames=on_frames)
    assert streamed.frames is None and sorted(got) == [0, 4, 8, 12]
    whole = V.load_video(clip, 16, size=32)
    assert streamed.indices == whole.indices
    np.testing.assert_array_equal(seen, whole.frames)
    with pytest.raises(ValueError, match="needs size"):
        V.load_video(clip, 16, on_frames=on_frames)


def test_a_failing_decoder_names_the_video_and_the_others_stop(clip, small_chunks, monkeypatch):
    decode = V.decode_frames
    calls = []

    def failing(reader, indices, size=None, **kw):
        calls.append(indices[0])
        if len(calls) == 2:
            raise RuntimeError("Invalid data found when processing input")
        return decode(reader, indices, size, **kw)

    monkeypatch.setattr(V, "decode_frames", failing)
    with pytest.raises(VideoDecodeError, match=r"cannot decode frames .* of video .*clip\.mp4: Invalid data"):
        V.load_video(clip, 80, size=32, on_frames=lambda start, frames: None)
    assert len(calls) < 20  # not every chunk of the video: the decoders stopped
    assert not [t for t in threading.enumerate() if "decode_run_of_chunks" in t.name]  # and ended


def test_the_consumers_error_passes_through_and_stops_decoding(clip, small_chunks, monkeypatch):
    decode = V.decode_frames
    calls = []
    monkeypatch.setattr(V, "decode_frames", lambda *a, **k: calls.append(1) or decode(*a, **k))

    def out_of_memory(start, frames):
        raise MemoryError("CUDA out of memory (from the vision tower)")

    with pytest.raises(MemoryError, match="CUDA out of memory"):
        V.load_video(clip, 80, size=32, on_frames=out_of_memory)
    assert len(calls) < 20
    assert not [t for t in threading.enumerate() if "decode_run_of_chunks" in t.name]
