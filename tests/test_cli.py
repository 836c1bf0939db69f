"""The standard ms-swift CLIs on the tiny default: sft (stages 1 and 2, LoRA), infer, export, deploy."""
import base64
import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import load_file

from deploy_process import DeployProcess
from swift_cli import CPU_TRAIN, SWIFT, env, sft, swift, train_losses
from swift_sophia.ms_swift.plugin_path import plugin_path

pytestmark = pytest.mark.slow


def _weights(path):
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def stage1(tiny_model_dir, synthetic_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stage1"))
    ckpt = sft(tiny_model_dir, synthetic_data["train"], out, "--tuner_type", "full", "--freeze_vit", "true",
               "--freeze_llm", "true", "--freeze_aligner", "false", "--learning_rate", "3e-4",
               "--lr_scheduler_type", "constant", "--max_steps", "6", "--per_device_train_batch_size", "4",
               "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_steps", "6")
    return ckpt


@pytest.fixture(scope="module")
def stage2(stage1, synthetic_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stage2"))
    ckpt = sft(stage1, synthetic_data["train"], out, "--tuner_type", "full", "--freeze_vit", "false",
               "--freeze_llm", "false", "--freeze_aligner", "false", "--learning_rate", "2e-3",
               "--warmup_ratio", "0.05", "--num_train_epochs", "6", "--per_device_train_batch_size", "8",
               "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--save_strategy", "epoch",
               "--save_total_limit", "1")
    return out, ckpt


def test_bad_rows_are_named_and_skipped_while_training(tiny_model_dir, synthetic_data, tmp_path):
    """ms-swift replaces a row that fails to encode by another one; the log names the problem and the video."""
    rows = [json.loads(line) for line in open(synthetic_data["train"])][:6]
    (tmp_path / "garbage.mp4").write_text("not a video")
    bad = [dict(rows[0], videos=[str(tmp_path / "missing.mp4")]), dict(rows[1], videos=[str(tmp_path / "garbage.mp4")]),
           {"messages": [{"role": "user", "content": "<video><video>two tags"}, {"role": "assistant", "content": "x"}],
            "videos": rows[2]["videos"]},
           {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}]
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[3:] + bad))
    out = str(tmp_path / "out")
    proc = subprocess.run([SWIFT, "sft", "--model", tiny_model_dir, "--model_type", "sophia", "--external_plugins",
                           plugin_path(), "--dataset", str(data), "--output_dir", out, *CPU_TRAIN, "--max_steps", "4",
                           "--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "1",
                           "--logging_steps", "1", "--gradient_checkpointing", "true"],
                          capture_output=True, text=True, env=env(), timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert f"video file not found: {tmp_path / 'missing.mp4'}" in log
    assert "cannot decode video" in log and "garbage.mp4" in log
    losses = train_losses(out)
    assert len(losses) == 4 and all(0 < loss < 20 for loss in losses)


def test_stage1_trains_only_the_new_modules(tiny_model_dir, stage1):
    before, after = _weights(tiny_model_dir), _weights(stage1)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.aggregator.") for k in changed)
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert not any(k.startswith(("model.language_model.", "lm_head.", "model.vision_tower.")) for k in changed)


def test_stage2_loss_falls_and_checkpoint_reloads(stage2):
    out, ckpt = stage2
    losses = train_losses(out)
    assert len(losses) >= 30
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, losses
    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration
    model = SophiaForConditionalGeneration.from_pretrained(ckpt)
    assert model.config.model_type == "sophia"


def test_infer_batch_over_validation_jsonl(stage2, synthetic_data, tmp_path):
    _, ckpt = stage2
    result = tmp_path / "result.jsonl"
    swift("infer", "--model", ckpt, "--val_dataset", synthetic_data["val"], "--infer_backend", "transformers",
          "--max_new_tokens", "4", "--max_batch_size", "2", "--result_path", result)
    rows = [json.loads(line) for line in open(result)]
    assert len(rows) == 4
    assert all(isinstance(r["response"], str) and r["response"] for r in rows)
    assert all(r["videos"] and r["labels"] for r in rows)


def test_infer_interactive_takes_a_video_path(stage2, synthetic_data, tmp_path):
    _, ckpt = stage2
    video = json.loads(open(synthetic_data["val"]).readline())["videos"][0]
    missing = tmp_path / "typo.mp4"
    question = "<video>What color is the background of the first shot? Answer with one word."
    # A mistyped path is asked for again; the session goes on and answers.
    script = f"{question}\n{missing}\n{video}\nexit\n"
    proc = swift("infer", "--model", ckpt, "--infer_backend", "transformers", "--max_new_tokens", "4",
                 "--stream", "false", input=script)
    text = proc.stdout + proc.stderr
    assert f"video file not found: {missing}" in text
    answered = text.split("Input a video path or URL <<< ")[-1]
    assert "-" * 50 in answered and "Traceback" not in text, text[-2000:]


def test_lora_export_merge_and_answer(tiny_model_dir, synthetic_data, tmp_path):
    out = str(tmp_path / "lora")
    ckpt = sft(tiny_model_dir, synthetic_data["train"], out, "--tuner_type", "lora", "--target_modules",
               "all-linear", "--max_steps", "3", "--per_device_train_batch_size", "4",
               "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--save_steps", "3",
               "--logging_steps", "1")
    adapter = json.load(open(os.path.join(ckpt, "adapter_config.json")))
    assert "language_model" in adapter["target_modules"] and "vision_tower" not in adapter["target_modules"]
    swift("export", "--adapters", ckpt, "--merge_lora", "true")
    merged = ckpt + "-merged"
    assert os.path.exists(os.path.join(merged, "model.safetensors"))
    result = tmp_path / "merged.jsonl"
    swift("infer", "--model", merged, "--val_dataset", synthetic_data["val"], "--infer_backend", "transformers",
          "--max_new_tokens", "3", "--result_path", result)
    assert len(open(result).readlines()) == 4


def _post(url, payload):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_deploy_serves_chat_completions_with_videos(stage2, synthetic_data, tmp_path):
    _, ckpt = stage2
    with DeployProcess([SWIFT, "deploy", "--model", ckpt, "--infer_backend", "transformers", "--max_new_tokens", "4",
                        "--served_model_name", "sophia-tiny"], tmp_path / "deploy.log", env=env()) as deploy:
        base = deploy.url
        models = deploy.wait_until_serving(timeout=240, poll_s=2)
        assert [m["id"] for m in models["data"]] == ["sophia-tiny"]

        video = json.loads(open(synthetic_data["val"]).readline())["videos"][0]
        data_url = "data:video/mp4;base64," + base64.b64encode(open(video, "rb").read()).decode()
        question = {"type": "text", "text": "What color is the background of the first shot? Answer with one word."}
        for part in ({"type": "video_url", "video_url": {"url": data_url}}, {"type": "video", "video": video}):
            status, body = _post(base + "/v1/chat/completions", {
                "model": "sophia-tiny", "messages": [{"role": "user", "content": [part, question]}],
                "max_tokens": 4, "temperature": 0})
            assert status == 200, body
            assert body["choices"][0]["message"]["content"]
            assert body["usage"]["prompt_tokens"] > 8 * 4  # the video's frames were in the prompt

        status, body = _post(base + "/v1/chat/completions", {
            "model": "sophia-tiny", "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "missing.mp4")},
                                                      question]}]})
        assert 400 <= status < 500
        assert "missing.mp4" in json.dumps(body)
        status, _ = _post(base + "/v1/chat/completions", {
            "model": "sophia-tiny", "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "video", "video": video}, question]}]})
        assert status == 200, "the server must keep serving after a bad request"


def test_stage3_trains_only_the_pruner(stage2, synthetic_data, tmp_path):
    _, ckpt = stage2
    out = str(tmp_path / "stage3")
    stage3 = sft(ckpt, synthetic_data["train"], out, "--tuner_type", "full", "--freeze_parameters_ratio", "1",
                 "--trainable_parameters", "model.pruner", "--learning_rate", "1e-2", "--max_steps", "4",
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--save_steps", "4",
                 "--logging_steps", "1", "--model_kwargs", json.dumps({"prune_alpha": 50, "prune_beta": 30}))
    before, after = _weights(ckpt), _weights(stage3)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.pruner.query_mlp.") for k in changed), changed
    assert all(k.startswith("model.pruner.") for k in changed), changed
    assert after["model.pruner.gumbel.step"] > before["model.pruner.gumbel.step"]


def test_infer_with_pruning(stage2, synthetic_data, tmp_path):
    """--model_kwargs pruning settings reach the run: shots are detected (and cached) for every video only then."""
    _, ckpt = stage2
    for pruning in (False, True):
        result, cache = tmp_path / f"answers-{pruning}.jsonl", tmp_path / f"shots-{pruning}"
        extra = ["--model_kwargs", json.dumps({"prune_alpha": 30, "prune_beta": 30})] if pruning else []
        run = swift("infer", "--model", ckpt, "--val_dataset", synthetic_data["val"], "--infer_backend",
                    "transformers", "--max_new_tokens", "3", "--result_path", result, *extra,
                    extra_env={"SOPHIA_SHOT_CACHE": str(cache)})
        rows = [json.loads(line) for line in open(result)]
        assert len(rows) == 4 and all(isinstance(r["response"], str) for r in rows)
        cached = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
        assert bool(cached) == pruning, (pruning, cached)
        said = "[sophia] frame pruning on: 30 % of each video's shots and 30 % of the frames of each kept shot"
        assert (said in run.stdout + run.stderr) == pruning


def test_out_of_range_pruning_is_refused_with_the_setting_named(stage2, synthetic_data, tmp_path):
    _, ckpt = stage2
    with pytest.raises(AssertionError, match=r"prune_alpha=150 is out of range: it is the percentage of shots to "
                                             r"drop, 0 <= prune_alpha < 100 \(set by PRUNE_ALPHA"):
        swift("infer", "--model", ckpt, "--val_dataset", synthetic_data["val"], "--infer_backend", "transformers",
              "--max_new_tokens", "3", "--result_path", tmp_path / "answers.jsonl", extra_env={"PRUNE_ALPHA": "150"})
    assert not (tmp_path / "answers.jsonl").exists()
