"""`sophia init-from-internvl`: an InternVL checkpoint becomes a Sophia one with its weights kept."""
import subprocess
import sys

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from swift_sophia.modeling_sophia import SophiaForConditionalGeneration
from swift_sophia.tiny import build_tokenizer


def test_init_from_internvl_keeps_weights_and_adds_tokens(tmp_path):
    tokenizer = build_tokenizer()
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14),
        text_config=dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4)
    torch.manual_seed(0)
    source = InternVLForConditionalGeneration(config)
    source.save_pretrained(tmp_path / "internvl")
    tokenizer.save_pretrained(tmp_path / "internvl")

    out = tmp_path / "sophia"
    subprocess.run([sys.executable, "-m", "swift_sophia", "init-from-internvl", str(tmp_path / "internvl"), str(out),
                    "--num-frames", "4"], check=True, capture_output=True)
    model = SophiaForConditionalGeneration.from_pretrained(out)
    assert model.config.num_frames == 4
    original = source.state_dict()
    for name, value in model.state_dict().items():
        if name in original:
            torch.testing.assert_close(value, original[name], msg=name)
    assert any(name.startswith("model.aggregator.") for name in model.state_dict())
