"""The video feature cache: a follow-up question about a video skips decoding, shots and the vision tower, and the
model sees exactly what it saw without the cache; a changed file or changed sampling is a miss; the cache is
bounded, off with SOPHIA_FEATURE_CACHE_GB=0, and never used in training."""
import pytest
import torch
from swift.infer_engine import InferRequest, RequestConfig, TransformersEngine

import swift_sophia.ms_swift.register  # noqa: F401
import swift_sophia.ms_swift.template as template_module
from helpers import model_and_template
from swift_sophia.model.feature_cache import VideoFeatureCache, VideoFeatures
from swift_sophia.video.synthetic_clips import random_clip_spec, render_clip, write_mp4

QUESTIONS = ("<video>What color is the first shot?", "<video>How many shots are there?")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    import random

    path = str(tmp_path_factory.mktemp("fc") / "clip.mp4")
    write_mp4(path, render_clip(random_clip_spec(random.Random(5), 3), 6, seed=5))
    return path


def _row(video, question):
    return {"messages": [{"role": "user", "content": question}], "videos": [video]}


class Counters:
    def __init__(self, model, monkeypatch):
        self.decoded, self.tower = 0, 0
        load = template_module.load_video

        def counting_load(*args, **kwargs):
            self.decoded += 1
            return load(*args, **kwargs)

        monkeypatch.setattr(template_module, "load_video", counting_load)
        model.model.vision_tower.register_forward_hook(lambda *a: setattr(self, "tower", self.tower + 1))


def _logits(model, template, row):
    batch = template.data_collator([template.encode(row)])
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("prune", [False, True])
def test_follow_up_question_reuses_features_and_gives_the_same_logits(tiny_model_dir, video, monkeypatch, prune):
    if prune:
        monkeypatch.setenv("PRUNE_ALPHA", "50")
        monkeypatch.setenv("PRUNE_BETA", "30")
    model, template = model_and_template(tiny_model_dir)
    counters = Counters(model, monkeypatch)
    first = _logits(model, template, _row(video, QUESTIONS[0]))
    assert (counters.decoded, len(model.video_feature_cache)) == (1, 1)
    tower = counters.tower
    if prune:  # shots come from the cached entry too
        monkeypatch.setattr("swift_sophia.video.shots.sampled_shots", lambda *a, **k: pytest.fail("shots recomputed"))
    follow_up = _logits(model, template, _row(video, QUESTIONS[1]))
    assert counters.decoded == 1 and counters.tower == tower  # no decoding, no vision tower
    monkeypatch.undo()
    if prune:
        monkeypatch.setenv("PRUNE_ALPHA", "50")
        monkeypatch.setenv("PRUNE_BETA", "30")
    monkeypatch.setenv("SOPHIA_FEATURE_CACHE_GB", "0")
    plain_model, plain_template = model_and_template(tiny_model_dir)
    assert not plain_model.video_feature_cache.enabled
    torch.testing.assert_close(follow_up, _logits(plain_model, plain_template, _row(video, QUESTIONS[1])),
                               rtol=0, atol=0)
    torch.testing.assert_close(first, _logits(plain_model, plain_template, _row(video, QUESTIONS[0])),
                               rtol=0, atol=0)
    assert len(plain_model.video_feature_cache) == 0


def test_a_batch_mixing_cached_and_new_videos(tiny_model_dir, video, tmp_path, monkeypatch):
    """Two rows in one batch, one whose video is cached and one that is not: the same logits as without the cache."""
    import random

    other = str(tmp_path / "other.mp4")
    write_mp4(other, render_clip(random_clip_spec(random.Random(9), 2), 5, seed=9))
    model, template = model_and_template(tiny_model_dir)
    _logits(model, template, _row(video, QUESTIONS[0]))
    rows = [_row(video, QUESTIONS[1]), _row(other, QUESTIONS[0])]
    template.padding_side = "left"
    batch = template.data_collator([template.encode(r) for r in rows])
    assert [s.hit for s in batch["video_feature_slots"]] == [True, False]
    with torch.no_grad():
        cached = model(**batch).logits
    monkeypatch.setenv("SOPHIA_FEATURE_CACHE_GB", "0")
    plain_model, plain_template = model_and_template(tiny_model_dir)
    plain_template.padding_side = "left"
    with torch.no_grad():
        plain = plain_model(**plain_template.data_collator([plain_template.encode(r) for r in rows])).logits
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)


def test_changed_file_or_sampling_is_a_miss(tiny_model_dir, video, tmp_path, monkeypatch):
    import random
    import shutil

    copy = str(tmp_path / "copy.mp4")
    shutil.copy(video, copy)
    model, template = model_and_template(tiny_model_dir)
    counters = Counters(model, monkeypatch)
    template.encode(_row(copy, QUESTIONS[0]))
    slot = template.encode(_row(copy, QUESTIONS[0]))["video_feature_slots"][0]
    assert not slot.hit  # encoding alone stores nothing: the model stores what its tower computed
    _logits(model, template, _row(copy, QUESTIONS[0]))
    assert template.encode(_row(copy, QUESTIONS[1]))["video_feature_slots"][0].hit
    decoded = counters.decoded
    write_mp4(copy, render_clip(random_clip_spec(random.Random(6), 3), 6, seed=6))  # same path, new content
    assert not template.encode(_row(copy, QUESTIONS[1]))["video_feature_slots"][0].hit
    assert counters.decoded == decoded + 1
    _logits(model, template, _row(copy, QUESTIONS[1]))
    monkeypatch.setenv("VIDEO_SEGMENTS", "3")
    template.init_env_args()
    enc = template.encode(_row(copy, QUESTIONS[1]))
    assert not enc["video_feature_slots"][0].hit and enc["video_frame_counts"].tolist() == [3]


def test_training_never_uses_the_cache(tiny_model_dir, video):
    model, template = model_and_template(tiny_model_dir, mode="train")
    row = _row(video, QUESTIONS[0])
    row["messages"].append({"role": "assistant", "content": "red"})
    for _ in range(2):
        enc = template.encode(row)
        assert "video_feature_slots" not in enc and enc["pixel_values_videos"].shape[0] > 0
        model.train()(**template.data_collator([enc])).loss.backward()
    assert len(model.video_feature_cache) == 0


def test_cache_is_bounded_least_recently_used_first_out():
    cache = VideoFeatureCache(max_bytes=3 * 4 * 100)  # three entries of 100 float32
    for key in "abc":
        assert cache.put(key, VideoFeatures([0], 1, 1.0, torch.zeros(1, 10, 10)))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", VideoFeatures([0], 1, 1.0, torch.zeros(1, 10, 10)))
    assert [k for k in "abcd" if cache.get(k) is not None] == ["a", "c", "d"]
    assert not cache.put("big", VideoFeatures([0], 1, 1.0, torch.zeros(4, 10, 10)))  # larger than the bound
    assert cache.nbytes <= cache.max_bytes


def test_bad_setting_names_the_variable(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SOPHIA_FEATURE_CACHE_GB", "lots")
    with pytest.raises(ValueError, match="SOPHIA_FEATURE_CACHE_GB='lots' is not valid"):
        VideoFeatureCache()


def test_engine_answers_follow_up_questions_from_the_cache(tiny_model_dir, video, monkeypatch):
    """ms-swift's own engine (what `swift infer` and `swift deploy` run): the second question about the video
    decodes nothing, and the answers equal those of an engine without the cache."""
    config = RequestConfig(max_tokens=4, temperature=0)
    requests = [InferRequest(messages=[{"role": "user", "content": q}], videos=[video]) for q in QUESTIONS]
    engine = TransformersEngine(tiny_model_dir, model_type="sophia")
    counters = Counters(engine.model, monkeypatch)
    answers = [engine.infer([r], config)[0].choices[0].message.content for r in requests]
    assert counters.decoded == 1
    monkeypatch.setenv("SOPHIA_FEATURE_CACHE_GB", "0")
    plain = TransformersEngine(tiny_model_dir, model_type="sophia")
    assert answers == [plain.infer([r], config)[0].choices[0].message.content for r in requests]


def _infer_cli(model_dir, *args, extra_env=None, input=None):
    from swift_cli import swift
    from swift_sophia.ms_swift.plugin_path import plugin_path

    return swift("infer", "--model", model_dir, "--model_type", "sophia", "--external_plugins", plugin_path(),
                 "--infer_backend", "transformers", "--max_new_tokens", "3", "--temperature", "0", *args,
                 timeout=300, extra_env=extra_env, input=input)


@pytest.mark.slow
def test_swift_infer_batch_of_questions_about_one_video(tiny_model_dir, video, tmp_path):
    """A dataset with several questions per video (the shape of Video-MME, MLVU, LVBench): the video is decoded and
    encoded once, and the answers are those of a run without the cache. The cached run streams the video's features
    (SOPHIA_STREAM_FEATURES=1, the default on a GPU), the other does not: the same answers either way."""
    import json

    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}], "videos": [video]}) + "\n"
                            for q in QUESTIONS + ("<video>Is the last shot dark?",)))
    responses = {}
    for gb in ("8", "0"):
        result = tmp_path / f"out{gb}.jsonl"
        proc = _infer_cli(tiny_model_dir, "--val_dataset", str(data), "--result_path", str(result),
                          "--max_batch_size", "1", extra_env={"SOPHIA_FEATURE_CACHE_GB": gb,
                                                              "SOPHIA_STREAM_FEATURES": "1" if gb == "8" else "0"})
        log = proc.stdout + proc.stderr
        assert log.count("reused (feature cache)") == (2 if gb == "8" else 0), log[-3000:]
        assert ("while the video decodes (streamed features" in log) == (gb == "8")
        responses[gb] = [json.loads(line)["response"] for line in result.read_text().splitlines()]
    assert len(responses["8"]) == 3 and responses["8"] == responses["0"]


@pytest.mark.slow
def test_swift_infer_interactive_follow_up_question(tiny_model_dir, video):
    script = f"{QUESTIONS[0]}\n{video}\n{QUESTIONS[1]}\n{video}\nexit\n"
    proc = _infer_cli(tiny_model_dir, "--stream", "false", input=script)
    text = proc.stdout + proc.stderr
    # The second request holds the conversation: the first question's video and the new one, both from the cache.
    assert text.count("reused (feature cache)") == 2 and "Traceback" not in text, text[-3000:]
