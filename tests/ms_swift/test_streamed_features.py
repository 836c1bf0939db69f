"""Video features computed while the video decodes (SOPHIA_STREAM_FEATURES; on by default when the model is on a
GPU): the template hands each decoded chunk of frames to the vision tower at once, the batch carries features, not
pixels, and the model gives the logits it gives from pixels; with the feature cache on, the streamed features are
what a follow-up question reuses."""
import pytest
import torch

import swift_sophia.ms_swift.register  # noqa: F401
from helpers import model_and_template
from swift_sophia.model.frame_features import FrameFeatureWriter
from swift_sophia.video import frames as V
from swift_sophia.video.synthetic_clips import random_clip_spec, render_clip, write_mp4


@pytest.fixture(autouse=True)
def six_frames(monkeypatch):
    monkeypatch.setenv("VIDEO_SEGMENTS", "6")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    import random

    path = str(tmp_path_factory.mktemp("stream") / "clip.mp4")
    write_mp4(path, render_clip(random_clip_spec(random.Random(7), 3), 6, seed=7))
    return path


def _row(video, question="<video>What color is the first shot?"):
    return {"messages": [{"role": "user", "content": question}], "videos": [video]}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("prune", [False, True])
def test_streamed_features_give_the_logits_of_pixels(tiny_model_dir, video, monkeypatch, prune):
    if prune:
        monkeypatch.setenv("PRUNE_ALPHA", "50")
        monkeypatch.setenv("PRUNE_BETA", "30")
    monkeypatch.setenv("SOPHIA_FEATURE_CACHE_GB", "0")
    monkeypatch.setattr(V, "RESIZE_CHUNK_FRAMES", 2)  # the video's 6 frames in 3 chunks
    monkeypatch.setenv("SOPHIA_STREAM_FEATURES", "0")
    model, template = model_and_template(tiny_model_dir)
    plain = template.data_collator([template.encode(_row(video))])
    assert plain["pixel_values_videos"].shape[0] == 6 and "video_feature_slots" not in plain
    expected = _logits(model, plain)

    monkeypatch.setenv("SOPHIA_STREAM_FEATURES", "1")
    template.init_env_args()
    chunks = []
    model.model.vision_tower.register_forward_hook(
        lambda m, args, kwargs, out: chunks.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    streamed = template.data_collator([template.encode(_row(video))])
    assert chunks == [2, 2, 2]  # the tower ran on each chunk as it decoded
    assert streamed["pixel_values_videos"].shape[0] == 0  # the batch carries features, not pixels
    (slot,) = streamed["video_feature_slots"]
    assert slot.hit and slot.fresh and slot.entry.features.shape[0] == 6
    torch.testing.assert_close(_logits(model, streamed), expected, rtol=1e-5, atol=1e-5)
    assert chunks == [2, 2, 2]  # and not again in the forward pass
    if prune:
        assert torch.equal(streamed["video_frame_shots"], plain["video_frame_shots"])


def test_streamed_features_are_cached_for_the_follow_up_question(tiny_model_dir, video, monkeypatch):
    monkeypatch.setenv("PRUNE_ALPHA", "50")
    monkeypatch.setenv("PRUNE_BETA", "30")
    monkeypatch.setenv("SOPHIA_STREAM_FEATURES", "1")
    model, template = model_and_template(tiny_model_dir)
    first = template.data_collator([template.encode(_row(video))])
    assert len(model.video_feature_cache) == 1  # stored by the template, with the video's shots
    _logits(model, first)
    assert len(model.video_feature_cache) == 1
    monkeypatch.setattr("swift_sophia.video.shots.sampled_shots", lambda *a, **k: pytest.fail("shots recomputed"))
    monkeypatch.setattr(V, "iter_resized", lambda *a, **k: pytest.fail("decoded again"))
    follow_up = template.data_collator([template.encode(_row(video, "<video>How many shots are there?"))])
    (slot,) = follow_up["video_feature_slots"]
    assert slot.hit and not slot.fresh
    assert torch.equal(slot.entry.features, first["video_feature_slots"][0].entry.features)
    _logits(model, follow_up)


def test_streaming_is_off_by_default_on_the_cpu_and_a_bad_setting_is_named(tiny_model_dir, video, monkeypatch):
    monkeypatch.delenv("SOPHIA_STREAM_FEATURES", raising=False)
    monkeypatch.setenv("SOPHIA_FEATURE_CACHE_GB", "0")
    model, template = model_and_template(tiny_model_dir)
    assert template.encode(_row(video))["pixel_values_videos"].shape[0] == 6
    monkeypatch.setenv("SOPHIA_STREAM_FEATURES", "sometimes")
    with pytest.raises(ValueError, match="SOPHIA_STREAM_FEATURES='sometimes' is not valid"):
        template.init_env_args()


def test_training_never_streams(tiny_model_dir, video, monkeypatch):
    monkeypatch.setenv("SOPHIA_STREAM_FEATURES", "1")
    model, template = model_and_template(tiny_model_dir)
    template.set_mode("train")
    row = _row(video)
    row["messages"].append({"role": "assistant", "content": "red"})
    enc = template.encode(row)
    assert "video_feature_slots" not in enc and enc["pixel_values_videos"].shape[0] == 6


def test_writer_takes_chunks_in_any_order_and_lays_them_out_for_the_pruner(tiny_model_dir):
    """In host memory (an hour's features on a GPU wait there while the pruner chooses) the writer keeps the pruner's
    descriptors; either way the features are those of the whole batch of pixels."""
    model, _ = model_and_template(tiny_model_dir)
    inner = model.model
    size = inner.config.vision_config.image_size[0]
    pixels = torch.randn(10, 3, size, size)
    with torch.no_grad():
        whole = inner.video_frame_features(pixels)
        for on_host in (False, True):
            writer = FrameFeatureWriter(inner, 10, whole.dtype, on_host=on_host)
            for start in (6, 0, 3):
                writer.add(start, pixels[start:start + {6: 4, 0: 3, 3: 3}[start]])
            features, descriptors = writer.result()
            torch.testing.assert_close(features, whole, rtol=1e-5, atol=1e-5)
            if on_host:
                torch.testing.assert_close(descriptors, inner.pruner.frame_descriptors(whole))
            else:
                assert descriptors is None
        short = FrameFeatureWriter(inner, 10, whole.dtype, on_host=False)
        short.add(0, pixels[:4])
        with pytest.raises(RuntimeError, match="4 of 10 frames"):
            short.result()
        with pytest.raises(IndexError, match="frames 8..11"):
            short.add(8, pixels[:4])
