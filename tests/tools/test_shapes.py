"""Named real shapes (swift_sophia/tools/shapes.py), `sophia build-random`, and a CPU smoke run of
benchmarks/bench_8b.py."""
import importlib.util
import json
import os

import pytest
import torch

from swift_sophia.tools.shapes import internvl_config, parameter_count, resolve_shape, shape_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_8b_shape_has_internvl25_8b_parameter_count():
    from transformers import InternVLForConditionalGeneration

    config = shape_config("internvl2.5-8b")
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1024, 24, 16, 4096)
    assert (v.image_size[0], v.patch_size[0], config.downsample_ratio, config.tokens_per_frame) == (448, 14, 0.5, 256)
    assert (t.model_type, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size) == ("llama", 4096, 32, 32, 8, 14336, 92544)
    assert t.max_position_embeddings >= 1 << 20 and not config.tie_word_embeddings
    assert max(config.image_token_id, config.video_token_id, t.eos_token_id) < t.vocab_size
    sophia = parameter_count(config)  # meta device: no memory, no init
    dense = parameter_count(internvl_config("internvl2.5-8b"), InternVLForConditionalGeneration)
    assert 7.9e9 <= dense <= 8.2e9, dense  # InternVL2.5-8B: 8.08 B
    d, levels = t.hidden_size, config.hier_levels
    new = (levels - 1) * (d * d * config.hier_arity + d) + 2 * (d * d + d)  # aggregation CNN + pruner's query MLP
    assert sophia == dense + new, (sophia, dense, new)
    assert 7.9e9 <= sophia - new <= 8.2e9


def test_shape_names():
    assert resolve_shape("sophia-8b") == resolve_shape("8B") == "internvl2.5-8b"
    assert shape_config("internvl3-8b").text_config.hidden_size == 3584
    with pytest.raises(ValueError, match="unknown shape"):
        resolve_shape("internvl9-1t")


def test_build_random_cli_writes_a_loadable_bf16_checkpoint(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from helpers import video_prompt
    from sophia_cli import main
    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration

    out = str(tmp_path / "random")
    assert main(["build-random", "--shape", "tiny-test", out]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "sophia"
    assert any(f.endswith(".safetensors") for f in os.listdir(out))
    model = SophiaForConditionalGeneration.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and len(tok) <= model.config.text_config.vocab_size
    assert GenerationConfig.from_pretrained(out).eos_token_id == tok.eos_token_id
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<VIDEO_CONTEXT>")
    frames, m = 4, model.config.tokens_per_frame
    ids = torch.tensor([video_prompt(tok, frames, m)])
    size = model.config.vision_config.image_size
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values_videos=torch.randn(frames, 3, size[0], size[1], dtype=torch.bfloat16),
                    video_frame_counts=torch.tensor([frames]), use_cache=True, logits_to_keep=1)
    assert out.logits.shape == (1, 1, model.config.text_config.vocab_size)


def test_flop_count_of_the_benchmark():
    bench = _module("bench_8b")
    config = shape_config("internvl2.5-8b")
    dense = bench.case_flops(config, 128, None)
    assert dense["tokens"] == 64 + 128 * 256 + 64
    n = dense["tokens"]
    assert dense["attention"] == n * (n + 1) // 2 * 32 * 4 * 128 * 32
    sophia = bench.case_flops(config, 128, 128)
    assert sophia["tokens"] == 128 + 256 * (128 + 64 + 32 + 16)
    assert sophia["attention"] < dense["attention"] / 4  # O(N) against O(N^2)
    vision = bench.vision_flops(config)["tower"]
    assert 0.6e12 < vision < 0.8e12  # InternViT-300M over 1,025 tokens: about 0.7 TFLOP a frame


def test_bench_8b_and_plot_run_on_cpu_at_tiny_shape(tmp_path):
    bench = _module("bench_8b")
    path = str(tmp_path / "tiny.json")
    assert bench.main(["--shape", "tiny", "--device", "cpu", "--prefill", "--train", "--frames", "8",
                       "--train-frames", "8", "--variants", "sophia-30", "dense", "--train-modes", "stage1",
                       "--warmup", "0", "--repeats", "1", "--train-repeats", "1", "--json", path]) == 0
    res = json.load(open(path))
    assert [r["status"] for r in res["prefill"] + res["train"]] == ["ok"] * 4
    assert res["prefill"][0]["kept"] == 6 and res["prefill"][0]["tokens"] < res["prefill"][0]["plain_tokens"] + 64
    assert all(r["floor_s"] > 0 for r in res["prefill"]) and res["meta"]["matmul_flops"] > 0
    assert all(r.get("grads_ok") for r in res["train"])
    pytest.importorskip("matplotlib")
    png = str(tmp_path / "plot.png")
    _module("plot_8b").main([path, "-o", png])
    assert os.path.getsize(png) > 10_000


def test_bench_8b_end_to_end_with_a_follow_up_question_on_cpu(tmp_path):
    """--e2e: a file to the first token, then a second question answered from the model's feature cache."""
    bench = _module("bench_8b")
    path = str(tmp_path / "e2e.json")
    assert bench.main(["--shape", "tiny", "--device", "cpu", "--dtype", "float32", "--e2e", "--make-video",
                       "--video", str(tmp_path / "v.mp4"), "--video-seconds", "12", "--video-size", "64", "48",
                       "--json", path]) == 0
    e2e = json.load(open(path))["e2e"]
    assert e2e["status"] == "ok" and e2e["frames"] == 12
    assert e2e["follow_up"]["status"] == "ok" and 0 < e2e["follow_up"]["kept"] <= 12
    assert e2e["overlapped_equal"] is True and e2e["total_overlapped_s"] > 0
