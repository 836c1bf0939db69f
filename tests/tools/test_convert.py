"""`sophia init-from-internvl`: an InternVL checkpoint becomes a Sophia one with its weights kept."""
import subprocess
import sys

import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration

from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration
from swift_sophia.tools.tiny import build_tokenizer


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
    original, converted = source.state_dict(), model.state_dict()
    # Every InternVL weight is in the Sophia checkpoint, unchanged; the only new ones are Sophia's modules.
    assert set(original) <= set(converted), sorted(set(original) - set(converted))[:5]
    for name, value in original.items():
        torch.testing.assert_close(converted[name], value, msg=name)
    new = set(converted) - set(original)
    assert new and all(n.startswith(("model.aggregator.", "model.pruner.")) for n in new), sorted(new)
    # ... with their documented start: the aggregator averages the children, the pruner's query map is the identity.
    agg = model.model.aggregator
    expected = torch.eye(agg.weight.shape[1])[None, :, :, None].expand_as(agg.weight) / agg.arity
    torch.testing.assert_close(agg.weight.detach(), expected)
    q = torch.randn(3, agg.weight.shape[1])
    torch.testing.assert_close(model.model.pruner.map_query(q), q)
