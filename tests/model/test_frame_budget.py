"""The frame budget (PRUNE_MAX_FRAMES / config prune_max_frames): at most K frames of a video reach the decoder,
the shots that best match the question first, the redundant frames of those shots next; `auto` from the GPU's free
memory; through `swift infer` and `swift deploy` on a long video."""
import json
import random
import urllib.request
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from swift_sophia.model import frame_budget
from swift_sophia.model.configuration_sophia import SophiaConfig, resolve_runtime_settings
from swift_sophia.model.pruning import FramePruner

D = 16
SHOTS = [(0, 3), (3, 5), (5, 9), (9, 12)]
# how well each shot matches the query: shot 2 best, then 0, 3, 1
MATCH = {0: 0.6, 1: -0.5, 2: 0.9, 3: 0.1}


def _video(seed=0):
    """[F, M=2, D] features: the frames of shot i point along cos(t_i) q + sin(t_i) e_i (t_i from MATCH), with
    small per-frame noise, so that shot scores follow MATCH and frames of a shot differ in redundancy."""
    g = torch.Generator().manual_seed(seed)
    query = torch.zeros(D)
    query[0] = 1.0
    frames = []
    for i, (a, b) in enumerate(SHOTS):
        other = torch.zeros(D)
        other[1 + i] = 1.0
        direction = MATCH[i] * query + (1 - MATCH[i] ** 2) ** 0.5 * other
        for _ in range(a, b):
            frames.append(direction + 0.3 * torch.randn(2, D, generator=g))
    return torch.stack(frames), query[None]


def _shot(frame):
    return next(i for i, (a, b) in enumerate(SHOTS) if a <= frame < b)


def _redundancy(feats):
    g = F.normalize(feats.float(), dim=-1).mean(dim=1)
    out = {}
    for a, b in SHOTS:
        sim = g[a:b] @ g[a:b].T
        for n in range(a, b):
            out[n] = float((sim[n - a].sum() - sim[n - a, n - a]) / (b - a - 1))
    return out


def test_the_budget_keeps_the_best_shots_then_drops_their_most_redundant_frames():
    feats, query = _video()
    pruner = FramePruner(D).eval()
    sel = pruner.select(feats, SHOTS, query, alpha=0, beta=0, max_frames=5)
    keep = sel.keep.tolist()
    assert len(keep) == 5
    # shot 2 (4 frames) then shot 0 (3 frames) hold 7 >= 5 frames: shots 1 and 3 go
    assert {_shot(n) for n in keep} == {0, 2} and sel.kept_shots.tolist() == [0, 2]
    # the two dropped frames are the two most redundant of shots 0 and 2
    redundancy = _redundancy(feats)
    candidates = sorted(list(range(0, 3)) + list(range(5, 9)), key=lambda n: (-redundancy[n], -n))
    assert sorted((set(range(0, 3)) | set(range(5, 9))) - set(keep)) == sorted(candidates[:2])
    assert sel.max_frames == 5


def test_a_budget_the_video_fits_changes_nothing_and_alpha_beta_come_first():
    feats, query = _video()
    pruner = FramePruner(D).eval()
    assert pruner.select(feats, SHOTS, query, alpha=0, beta=0, max_frames=12).keep.tolist() == list(range(12))
    plain = pruner.select(feats, SHOTS, query, alpha=30, beta=30)
    assert pruner.select(feats, SHOTS, query, alpha=30, beta=30, max_frames=len(plain.keep)).keep.tolist() \
        == plain.keep.tolist()
    budgeted = pruner.select(feats, SHOTS, query, alpha=30, beta=30, max_frames=3).keep.tolist()
    assert len(budgeted) == 3 and set(budgeted) <= set(plain.keep.tolist())


def test_a_shot_never_loses_its_last_frame_and_every_budget_is_met_exactly():
    feats, query = _video(seed=3)
    pruner = FramePruner(D).eval()
    for budget in range(1, 12):
        keep = pruner.select(feats, SHOTS, query, alpha=0, beta=0, max_frames=budget).keep.tolist()
        assert len(keep) == budget
        assert {_shot(n) for n in keep} == set(pruner.select(feats, SHOTS, query, alpha=0, beta=0,
                                                             max_frames=budget).kept_shots.tolist())


def test_without_a_query_the_budget_spreads_the_frames_evenly():
    feats, _ = _video()
    sel = FramePruner(D).eval().select(feats, SHOTS, None, alpha=0, beta=0, max_frames=4)
    assert sel.keep.tolist() == [1, 4, 7, 10]  # candidates[floor((i + 1/2) * 12 / 4)]


def test_in_training_the_budget_is_a_gumbel_top_k_with_straight_through_gates():
    feats, query = _video()
    pruner = FramePruner(D).train()
    pruner.query_mlp[2].weight.data.normal_(0, 0.1)  # a query MLP whose gradient is not zero
    query = query.requires_grad_(True)
    sel = pruner.select(feats, SHOTS, query, alpha=0, beta=0, tau=0.5, max_frames=5,
                        generator=torch.Generator().manual_seed(0))
    assert len(sel.keep) == 5 and sel.stochastic
    assert torch.equal(sel.gate.detach(), torch.ones(5))
    (sel.gate * torch.arange(5.0)).sum().backward()
    assert pruner.query_mlp[0].weight.grad is not None and pruner.query_mlp[0].weight.grad.abs().sum() > 0


def test_the_setting_is_read_from_the_environment_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("PRUNE_MAX_FRAMES", "auto")
    assert resolve_runtime_settings(SophiaConfig()).prune_max_frames == "auto"
    monkeypatch.setenv("PRUNE_MAX_FRAMES", "1536")
    assert resolve_runtime_settings(SophiaConfig()).prune_max_frames == 1536
    for bad in ("many", "-3", "2.5"):
        monkeypatch.setenv("PRUNE_MAX_FRAMES", bad)
        with pytest.raises(ValueError, match="PRUNE_MAX_FRAMES=.*whole number of frames"):
            resolve_runtime_settings(SophiaConfig())
    with pytest.raises(ValueError, match="prune_max_frames"):
        SophiaConfig(prune_max_frames="lots")


def test_auto_shares_what_free_memory_holds_among_the_videos_by_frame_count(monkeypatch):
    from swift_sophia.tools.shapes import shape_config

    config = shape_config("internvl2.5-8b")
    config.prune_max_frames = "auto"
    per_frame = frame_budget.bytes_per_kept_frame(config)
    # KV cache: 256 tokens x 32 layers x 2 x 8 heads x 128 x 2 bytes = 32 MiB a frame, plus the working set
    assert 32 << 20 < per_frame < 64 << 20
    monkeypatch.setattr(frame_budget, "free_device_bytes", lambda device: frame_budget.MARGIN_BYTES + 400 * per_frame)
    assert frame_budget.frame_budgets(config, [1000, 3000], torch.device("cuda")) == [100, 300]
    assert frame_budget.frame_budgets(config, [1000], torch.device("cpu")) == [None]  # no GPU: no estimate
    config.prune_max_frames = 64
    assert frame_budget.frame_budgets(config, [1000, 10], torch.device("cpu")) == [64, 64]


def test_the_model_keeps_at_most_the_budget(tiny_model_dir):
    from transformers import AutoTokenizer

    from helpers import left_pad, video_prompt
    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir, prune_max_frames=3).eval()
    frames = (12, 2)
    rows = [video_prompt(tokenizer, f, model.config.tokens_per_frame) for f in frames]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    inputs = dict(input_ids=ids, attention_mask=mask, video_frame_counts=torch.tensor(frames),
                  pixel_values_videos=torch.randn(sum(frames), 3, 56, 56, generator=torch.Generator().manual_seed(0)),
                  video_frame_shots=torch.tensor([0] * 4 + [1] * 4 + [2] * 4 + [0, 0]))
    with torch.no_grad():
        out = model(**inputs)
        cached = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        full = model.generate(**inputs, max_new_tokens=4, do_sample=False, use_cache=False)
    assert [len(k) for k in out.kept_frames] == [3, 2]
    assert torch.equal(cached, full)


# ------------------------------------------------------------------------------------------------ the CLIs
@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """A 'long' video for the tiny model: 8 shots of 6 frames."""
    from swift_sophia.video.synthetic_clips import random_clip_spec, render_clip, write_mp4

    path = str(tmp_path_factory.mktemp("budget") / "long.mp4")
    write_mp4(path, render_clip(random_clip_spec(random.Random(0), num_shots=8), frames_per_shot=6, size=64))
    return path


BUDGET_ENV = {"VIDEO_SEGMENTS": "32", "PRUNE_MAX_FRAMES": "6"}


def test_swift_infer_reads_a_long_video_under_the_budget(tiny_model_dir, long_video, tmp_path):
    from swift_cli import swift
    from swift_sophia.ms_swift.plugin_path import plugin_path

    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "<video>What color is the first shot?"}],
                                "videos": [long_video]}) + "\n")
    result = tmp_path / "out.jsonl"
    proc = swift("infer", "--model", tiny_model_dir, "--model_type", "sophia", "--external_plugins", plugin_path(),
                 "--infer_backend", "transformers", "--max_new_tokens", "3", "--val_dataset", str(data),
                 "--result_path", str(result), timeout=300, extra_env=BUDGET_ENV)
    log = proc.stdout + proc.stderr
    assert "video 0: 6 of 32 frames kept (frame budget 6)" in log, log[-3000:]
    assert "at most 6 frames of each video" in log
    row = json.loads(result.read_text().splitlines()[0])
    assert row["response"] is not None and not row.get("error")


def test_swift_deploy_answers_a_long_video_under_the_budget_and_logs_what_it_kept(tiny_model_dir, long_video,
                                                                                  tmp_path):
    from deploy_process import DeployProcess
    from swift_cli import SWIFT, env
    from swift_sophia.ms_swift.plugin_path import plugin_path

    cmd = [SWIFT, "deploy", "--model", tiny_model_dir, "--model_type", "sophia", "--external_plugins", plugin_path(),
           "--infer_backend", "transformers", "--served_model_name", "sophia", "--max_new_tokens", "3"]
    with DeployProcess(cmd, tmp_path / "deploy.log", env=env(**BUDGET_ENV)) as deploy:
        deploy.wait_until_serving(timeout=300)
        body = {"model": "sophia", "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "video", "video": long_video}, {"type": "text", "text": "What color is the first shot?"}]}]}
        request = urllib.request.Request(deploy.url + "/v1/chat/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=300) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["message"]["content"] is not None
        assert "video 0: 6 of 32 frames kept (frame budget 6)" in deploy.log()


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_features_waiting_in_host_memory_give_the_same_answer(tiny_model_dir, monkeypatch, pooling):
    """At inference with pruning on a GPU the frames' features wait in host memory while the pruner chooses from
    descriptors computed chunk by chunk on the device; forced here on the CPU (4-frame chunks): the same kept frames
    and the same logits as with the features all in one tensor."""
    from transformers import AutoTokenizer

    from helpers import left_pad, video_prompt
    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration, SophiaModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir, prune_max_frames=5, prune_alpha=30,
                                                           prune_beta=30, vision_chunk_frames=4).eval()
    model.model.pruner.pooling = pooling
    frames = (14, 3)
    rows = [video_prompt(tokenizer, f, model.config.tokens_per_frame) for f in frames]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    inputs = dict(input_ids=ids, attention_mask=mask, video_frame_counts=torch.tensor(frames),
                  pixel_values_videos=torch.randn(sum(frames), 3, 56, 56, generator=torch.Generator().manual_seed(0)),
                  video_frame_shots=torch.tensor([0] * 4 + [1] * 5 + [2] * 5 + [0, 1, 1]),
                  video_query_ids=ids[:, -5:], video_query_mask=torch.ones(2, 5, dtype=torch.long))
    results = {}
    for on_host in (False, True):
        monkeypatch.setattr(SophiaModel, "_features_on_host", lambda self, frames, like: on_host)
        with torch.no_grad(), mock.patch.object(SophiaModel, "_frame_features_on_host",
                                                wraps=model.model._frame_features_on_host) as spy:
            out = model(**inputs)
        assert spy.called == on_host
        results[on_host] = out
    assert results[True].kept_frames == results[False].kept_frames and len(results[True].kept_frames[0]) == 5
    assert torch.equal(results[True].logits, results[False].logits)
