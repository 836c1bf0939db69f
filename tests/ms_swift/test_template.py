"""The `sophia` template through ms-swift's own API: encoding, collation and every kind of bad input."""
import json

import numpy as np
import pytest
import torch
from swift.model import get_model_processor
from swift.template import get_template

import swift_sophia.ms_swift.register  # noqa: F401
from swift_sophia.video.synthetic_clips import write_mp4


@pytest.fixture(scope="module")
def template(tiny_model_dir):
    _, processor = get_model_processor(tiny_model_dir, model_type="sophia", load_model=False)
    t = get_template(processor, template_type="sophia")
    t.set_mode("train")
    return t


@pytest.fixture(scope="module")
def sample(synthetic_data):
    return json.loads(open(synthetic_data["train"]).readline())


def _row(videos, text="<video>What color?"):
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "red"}],
            "videos": videos}


def test_video_becomes_contiguous_frame_tokens(template, sample):
    enc = template.encode(sample)
    config = template.config
    m, frames = config.tokens_per_frame, config.num_frames
    ids = enc["input_ids"]
    assert ids.count(config.video_token_id) == frames * m
    first = ids.index(config.video_token_id)
    assert ids[first:first + frames * m] == [config.video_token_id] * (frames * m)
    assert enc["pixel_values_videos"].shape == (frames, 3, 56, 56)
    assert enc["video_frame_counts"].tolist() == [frames]
    assert template.tokenizer.decode(enc["video_query_ids"][0]).startswith("What color")
    # Only the answer is trained on.
    labels = [t for t in enc["labels"] if t != -100]
    assert template.tokenizer.decode(labels).startswith(sample["messages"][1]["content"])


def test_decoded_frames_are_not_kept_after_encoding(template, sample, monkeypatch):
    """At hour scale the uint8 frames are gigabytes: once converted to pixel values no clip holds them."""
    import swift_sophia.ms_swift.template as T

    clips, load = [], T.load_video
    monkeypatch.setattr(T, "load_video", lambda *a, **k: clips.append(load(*a, **k)) or clips[-1])
    enc = template.encode(_row([sample["videos"][0]] * 2, "<video><video>What color?"))
    assert len(clips) == 2 and all(c.frames is None for c in clips)
    assert enc["pixel_values_videos"].shape[0] == 2 * template.config.num_frames


def test_frame_count_follows_video_segments(template, sample, monkeypatch):
    monkeypatch.setenv("VIDEO_SEGMENTS", "3")
    template.init_env_args()
    try:
        enc = template.encode(sample)
        assert enc["video_frame_counts"].tolist() == [3]
    finally:
        monkeypatch.delenv("VIDEO_SEGMENTS")
        template.init_env_args()


@pytest.fixture()
def clip100(tmp_path):
    """100 frames at 25 fps: 4 seconds."""
    from clips import write_clip
    return write_clip(tmp_path / "four_seconds.mp4", [50, 50])


def _reinit(template, monkeypatch, **env):
    for name in ("VIDEO_SEGMENTS", "FPS", "FPS_MIN_FRAMES", "FPS_MAX_FRAMES"):
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))
    template.init_env_args()


def test_frame_count_follows_fps(template, clip100, monkeypatch):
    try:
        _reinit(template, monkeypatch, FPS=2)  # 4 s at 2 fps
        assert template.encode(_row([clip100]))["video_frame_counts"].tolist() == [8]
        _reinit(template, monkeypatch, FPS=2, FPS_MAX_FRAMES=5)
        assert template.encode(_row([clip100]))["video_frame_counts"].tolist() == [5]
        _reinit(template, monkeypatch, FPS=0.25)  # 1 frame by rate, FPS_MIN_FRAMES (4) by default
        assert template.encode(_row([clip100]))["video_frame_counts"].tolist() == [4]
        _reinit(template, monkeypatch, FPS=2, VIDEO_SEGMENTS=3)  # an explicit VIDEO_SEGMENTS wins
        enc = template.encode(_row([clip100]))
        assert enc["video_frame_counts"].tolist() == [3] and enc["pixel_values_videos"].shape[0] == 3
    finally:
        _reinit(template, monkeypatch)


@pytest.mark.parametrize("name,value", [("VIDEO_SEGMENTS", "abc"), ("FPS", "-1"), ("FPS_MAX_FRAMES", "x")])
def test_bad_sampling_values_name_the_variable(template, monkeypatch, name, value):
    try:
        with pytest.raises(ValueError, match=f"{name}='{value}' is not valid"):
            _reinit(template, monkeypatch, **{"FPS": 1, name: value})
    finally:
        _reinit(template, monkeypatch)


def test_pruning_settings_are_resolved_once(template, sample, monkeypatch):
    import inspect

    import swift_sophia.ms_swift.template as T
    assert "modeling_sophia" not in inspect.getsource(T)
    config = template.config
    try:
        monkeypatch.setenv("PRUNE_ALPHA", "30")
        template.init_env_args()
        assert config.prune_alpha == 30 and config.prune_beta == 0
        monkeypatch.delenv("PRUNE_ALPHA")  # read once, at init_env_args: later changes do not matter
        enc = template.encode(sample)
        assert enc["video_frame_shots"].shape == (config.num_frames,)
        config.prune_alpha = 0.0
        assert "video_frame_shots" not in template.encode(sample)
    finally:
        config.prune_alpha, config.prune_beta = 0.0, 0.0


def test_collator_concatenates_videos_and_pads_queries(template, sample):
    text_only = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    batch = template.data_collator([template.encode(sample), template.encode(text_only), template.encode(sample)])
    frames = template.config.num_frames
    assert batch["pixel_values_videos"].shape[0] == 2 * frames
    assert batch["video_frame_counts"].tolist() == [frames, frames]
    assert batch["video_query_ids"].shape[0] == 2 and batch["video_query_mask"].shape == batch["video_query_ids"].shape


def test_several_videos_in_one_sample(template, sample):
    row = _row(sample["videos"] * 2, "<video>first, <video>second: same colour?")
    enc = template.encode(row)
    assert enc["video_frame_counts"].tolist() == [template.config.num_frames] * 2
    assert len(enc["video_query_ids"]) == 2


def test_one_frame_video(template, tmp_path):
    path = str(tmp_path / "one.mp4")
    write_mp4(path, np.full((1, 64, 64, 3), 200, dtype=np.uint8))
    enc = template.encode(_row([path]))
    assert enc["video_frame_counts"].tolist() == [1]


def test_missing_video_names_the_file(template, tmp_path):
    missing = str(tmp_path / "nope.mp4")
    with pytest.raises(ValueError, match="video file not found: .*nope.mp4"):
        template.encode(_row([missing]))


def test_file_that_is_not_a_video(template, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video")
    with pytest.raises(ValueError, match="cannot decode video .*notes.mp4"):
        template.encode(_row([str(bad)]))


def test_empty_data_url_says_it_is_empty(template):
    with pytest.raises(ValueError, match="video <data URL, 22 chars> is empty"):
        template.encode(_row(["data:video/mp4;base64,"]))


def test_zero_frame_video(template, tmp_path):
    import av

    path = str(tmp_path / "empty.mp4")
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
    with pytest.raises(ValueError, match="empty.mp4"):
        template.encode(_row([path]))


def test_tag_and_video_count_mismatch(template, sample):
    with pytest.raises(ValueError, match="2 <video> tag\\(s\\) but 1 video"):
        template.encode(_row(sample["videos"], "<video><video>What color?"))
    with pytest.raises(ValueError, match="1 <video> tag\\(s\\) but 2 video"):
        template.encode(_row(sample["videos"] * 2, "<video>What color?"))
    with pytest.raises(ValueError, match="1 <video> tag\\(s\\) but 0 video\\(s\\) \\[none\\]"):
        template.encode(_row([], "<video>What color?"))


def test_untagged_videos_get_default_tags(template, sample):
    enc = template.encode(_row(sample["videos"], "What color?"))
    assert enc["video_frame_counts"].tolist() == [template.config.num_frames]


def test_too_long_input_is_rejected(tiny_model_dir, sample):
    from swift.template.base import MaxLengthError

    _, processor = get_model_processor(tiny_model_dir, model_type="sophia", load_model=False)
    t = get_template(processor, template_type="sophia", max_length=16)
    t.set_mode("train")
    with pytest.raises(MaxLengthError):
        t.encode(sample)


def test_padding_free_batch_trains_like_a_padded_batch(tiny_model_dir, synthetic_data):
    """--padding_free / --packing: ms-swift packs the encoded rows into one (position_ids restart per sample) and
    then collates; the model must see the same videos, queries and labels and give the same loss."""
    import torch

    model, processor = get_model_processor(tiny_model_dir, model_type="sophia")
    model.eval()
    rows = [json.loads(line) for line in open(synthetic_data["train"])][:3]
    losses = {}
    for padding_free in (False, True):
        t = get_template(processor, template_type="sophia", padding_free=padding_free)
        t.set_mode("train")
        encoded = []
        for row in rows:
            enc = t.encode(row)
            enc["length"] = len(enc["input_ids"])
            encoded.append(enc)
        batch = t.data_collator(list(encoded))  # padding_free replaces the list's items by the packed row
        if padding_free:
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
            assert batch["video_frame_counts"].tolist() == [e["video_frame_counts"].item() for e in encoded]
            assert batch["video_query_ids"].shape[0] == len(rows)
        with torch.no_grad():
            losses[padding_free] = model(**batch).loss.item()
    assert abs(losses[True] - losses[False]) < 1e-4 * max(1.0, abs(losses[False])), losses


def test_each_video_gets_the_question_asked_about_it(template, sample):
    """A <video> in the system prompt takes the first user question; later videos keep their own turn's question
    (the queries were matched by position, so one tag outside the user text shifted every later video's)."""
    video = sample["videos"][0]
    row = {"messages": [{"role": "system", "content": "<video>You watch this clip first."},
                        {"role": "user", "content": "Which shape is it?"},
                        {"role": "assistant", "content": "circle"},
                        {"role": "user", "content": "<video>What color is the background?"},
                        {"role": "assistant", "content": "red"}],
           "videos": [video, video]}
    enc = template.encode(row)
    decode = template.tokenizer.decode
    assert [decode(q).strip() for q in enc["video_query_ids"]] == ["Which shape is it?",
                                                                  "What color is the background?"]


def test_queries_from_content_parts():
    from swift_sophia.ms_swift.template import _text_and_videos

    parts = [{"type": "video", "video": "a.mp4"}, {"type": "text", "text": "What happens?"},
             {"type": "video_url", "video_url": {"url": "b.mp4"}}]
    assert _text_and_videos(parts) == ("What happens?", 2)
    assert _text_and_videos("<video>Why <image>here?") == ("Why here?", 1)


def test_shots_are_found_while_the_frames_decode(template, sample, monkeypatch):
    """With pruning on, the shot detector starts on a video's sampled frames in a thread of its own as soon as they
    are known, while the main thread decodes them; the shots are the same as found one after the other."""
    import threading

    import swift_sophia.video.frames as video_module
    import swift_sophia.video.shots as shots_module

    config = template.config
    expected = None
    try:
        config.prune_alpha = 30.0
        expected = template.encode(sample)["video_frame_shots"]
        started, threads = threading.Event(), []
        find, decode = shots_module.sampled_shots, video_module.decode_resized

        def finding(*args, **kwargs):
            threads.append(threading.get_ident())
            started.set()
            return find(*args, **kwargs)

        def decoding(*args, **kwargs):
            assert started.wait(timeout=30), "the shot detector did not start before the frames were decoded"
            return decode(*args, **kwargs)

        monkeypatch.setattr(shots_module, "sampled_shots", finding)
        monkeypatch.setattr(video_module, "decode_resized", decoding)
        got = template.encode(sample)["video_frame_shots"]
    finally:
        config.prune_alpha = 0.0
    assert threads and threads[0] != threading.get_ident()
    assert torch.equal(got, expected)
