"""The ablation switches of one checkpoint: hierarchy off (plain causal attention over the kept frames), E, and the
environment settings that carry them into `swift infer` / `swift deploy` / `swift eval`."""
import pytest
import torch
from transformers import AutoTokenizer

from helpers import left_pad, video_prompt
from swift_sophia.model.configuration_sophia import resolve_runtime_settings
from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _inputs(model, tokenizer, frames=(5,), seed=0):
    rows = [video_prompt(tokenizer, f, model.config.tokens_per_frame) for f in frames]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=ids, attention_mask=mask,
                pixel_values_videos=torch.randn(sum(frames), 3, 56, 56, generator=g),
                video_frame_counts=torch.tensor(frames))


def _dense_logits(model, inputs):
    """What an InternVL-style model computes with the same weights: frame features in place of the placeholders,
    the decoder's causal attention over the plain sequence."""
    inner = model.model
    embeds = inner.get_input_embeddings()(inputs["input_ids"])
    features = inner.video_frame_features(inputs["pixel_values_videos"]).to(embeds.dtype)
    mask = inputs["input_ids"] == model.config.video_token_id
    embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]))
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).last_hidden_state
    return model.lm_head(hidden)


def test_hierarchy_off_is_plain_causal_attention_over_the_frames(tiny_model_dir, tokenizer, monkeypatch):
    monkeypatch.setenv("SOPHIA_HIERARCHY", "0")
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    assert model.config.use_hierarchy is False
    inputs = _inputs(model, tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
        dense = _dense_logits(model, inputs)
        model.config.use_hierarchy = True
        hierarchical = model(**inputs).logits
    torch.testing.assert_close(logits, dense, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hierarchical[:, -1], dense[:, -1], atol=1e-3), "the hierarchy changed nothing"


def test_hierarchy_off_generates_from_its_cache_and_prunes(tiny_model_dir, tokenizer, monkeypatch):
    monkeypatch.setenv("SOPHIA_HIERARCHY", "off")
    monkeypatch.setenv("PRUNE_BETA", "50")
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    inputs = _inputs(model, tokenizer, frames=(6, 3))
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        full = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
        kept = model.model(**inputs).kept_frames
    assert torch.equal(cached, full)
    assert [len(k) for k in kept] == [3, 1]  # half of each video's frames dropped, rounded down (one shot each)


def test_hierarchy_off_refuses_training(tiny_model_dir, tokenizer):
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir, use_hierarchy=False).train()
    inputs = _inputs(model, tokenizer)
    with pytest.raises(ValueError, match="evaluation ablation"):
        model(**inputs, labels=inputs["input_ids"])


def test_neighbours_can_change_at_load_and_bad_values_are_named(tiny_model_dir, tokenizer, monkeypatch):
    base = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    monkeypatch.setenv("HIER_NEIGHBOURS", "0")
    narrow = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    assert (base.config.hier_neighbours, narrow.config.hier_neighbours) == (2, 0)
    inputs = _inputs(base, tokenizer, frames=(8,))
    with torch.no_grad():
        assert not torch.allclose(base(**inputs).logits[:, -1], narrow(**inputs).logits[:, -1], atol=1e-4)
    monkeypatch.setenv("SOPHIA_HIERARCHY", "maybe")
    with pytest.raises(ValueError, match="SOPHIA_HIERARCHY='maybe'.*use_hierarchy"):
        resolve_runtime_settings(base.config)
