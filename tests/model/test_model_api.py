"""The model behaves as a transformers VLM: inputs_embeds, return_dict, attention implementations, outputs, Auto
classes, and initialisation from checkpoints without Sophia's modules."""
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from helpers import video_prompt
from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration, SophiaModel


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _video_inputs(model, tokenizer, frames=4, seed=0):
    m = model.config.tokens_per_frame
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=torch.tensor([video_prompt(tokenizer, frames, m)]),
                pixel_values_videos=torch.randn(frames, 3, 56, 56, generator=g),
                video_frame_counts=torch.tensor([frames]))


def _image_ids(model, tokenizer):
    img = tokenizer.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
    return torch.tensor([[img[0]] + [img[1]] * model.config.tokens_per_frame + [img[2]] + tokenizer.encode("shape?")])


def test_inputs_embeds_instead_of_input_ids(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    video = _video_inputs(model, tokenizer)
    image = dict(input_ids=_image_ids(model, tokenizer), pixel_values=torch.randn(1, 3, 56, 56))
    with torch.no_grad():
        for inputs in (video, image):
            ids = inputs.pop("input_ids")
            by_ids = model(input_ids=ids, **inputs).logits
            by_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), **inputs).logits
            torch.testing.assert_close(by_embeds, by_ids)
        ids = video.pop("input_ids") if "input_ids" in video else _video_inputs(model, tokenizer)["input_ids"]
        from_ids = model.generate(input_ids=ids, **video, max_new_tokens=4, do_sample=False)[:, ids.shape[1]:]
        from_embeds = model.generate(inputs_embeds=model.get_input_embeddings()(ids), **video, max_new_tokens=4,
                                     do_sample=False)
    assert torch.equal(from_embeds, from_ids)


def test_return_dict_false_gives_tuples(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    video = _video_inputs(model, tokenizer)
    labels = video["input_ids"].clone()
    with torch.no_grad():
        for inputs in (video, dict(input_ids=video["input_ids"][:, :5])):
            as_dict = model(**inputs, labels=inputs["input_ids"])
            as_tuple = model(**inputs, labels=inputs["input_ids"], return_dict=False)
            assert isinstance(as_tuple, tuple)
            torch.testing.assert_close(as_tuple[0], as_dict.loss)
            torch.testing.assert_close(as_tuple[1], as_dict.logits)
            base = model.model(**inputs, return_dict=False)
            assert isinstance(base, tuple) and base[0].shape[:2] == inputs["input_ids"].shape
    del labels


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_setting_the_attention_implementation_keeps_the_hierarchy(tiny_model_dir, implementation, monkeypatch):
    import swift_sophia.model.attention as sophia_attention

    # the decoder's own forward, where the router does the work (the lean prefill calls the kernel itself)
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir, lean_prefill=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    inputs = _video_inputs(model, tokenizer)
    calls = []
    real = sophia_attention.hierarchical_attention
    monkeypatch.setattr(sophia_attention, "hierarchical_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        before = model(**inputs).logits
        model.set_attn_implementation(implementation)
        after = model(**inputs).logits
        model.model.language_model.set_attn_implementation(implementation)  # the decoder alone, too
        again = model(**inputs).logits
    layers = model.config.text_config.num_hidden_layers
    assert len(calls) == 3 * layers
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, before, rtol=1e-5, atol=1e-5)


def test_eager_attention_uses_the_decoders_own_function_and_returns_weights(tiny_model_dir, monkeypatch):
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.text_config.output_attentions = True  # allowed: the implementation is still called "eager"
    calls = []
    real = qwen2.eager_attention_forward
    monkeypatch.setattr(qwen2, "eager_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.tensor([tokenizer.encode("hello there")])
    with torch.no_grad():
        out = model(input_ids=ids)
    assert len(calls) == model.config.text_config.num_hidden_layers
    assert len(out.attentions) == len(calls) and out.attentions[0].shape[-2:] == (ids.shape[1], ids.shape[1])


def test_video_forward_returns_hidden_states_on_the_plain_sequence(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    inputs = _video_inputs(model, tokenizer)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    assert all(h.shape[:2] == inputs["input_ids"].shape for h in out.hidden_states)
    # The last entry is the final (normed) state, the one the LM head reads.
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)


def test_auto_model_is_the_base_model_and_the_head_adds_only_lm_head_and_loss(model_and_tokenizer, tiny_model_dir):
    model, tokenizer = model_and_tokenizer
    base = AutoModel.from_pretrained(tiny_model_dir).eval()
    assert type(base) is SophiaModel
    inputs = _video_inputs(model, tokenizer)
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), model(**inputs).logits)
    assert hidden.shape[:2] == inputs["input_ids"].shape


def test_both_models_derive_from_the_sophia_base_as_transformers_vlms_do(model_and_tokenizer):
    """SophiaModel and SophiaForConditionalGeneration share SophiaPreTrainedModel; the head builds one SophiaModel;
    what must not be split over devices comes from the vision tower and the decoder the config names; the outputs
    add their fields to InternVL's."""
    import dataclasses

    from transformers import PreTrainedModel
    from transformers.models.internvl.modeling_internvl import (
        InternVLCausalLMOutputWithPast,
        InternVLForConditionalGeneration,
        InternVLModelOutputWithPast,
    )

    from swift_sophia.model.modeling_sophia import (
        SophiaCausalLMOutput,
        SophiaModelOutputWithPast,
        SophiaPreTrainedModel,
    )

    model, _ = model_and_tokenizer
    assert isinstance(model, SophiaPreTrainedModel) and isinstance(model.model, SophiaPreTrainedModel)
    assert not isinstance(model, InternVLForConditionalGeneration)
    assert [type(m).__name__ for m in model.modules() if isinstance(m, PreTrainedModel)] == [
        "SophiaForConditionalGeneration", "SophiaModel", "InternVLVisionModel", "Qwen2Model"]
    assert model._no_split_modules == {"InternVLVisionLayer", "Qwen2DecoderLayer"}
    for ours, theirs in ((SophiaModelOutputWithPast, InternVLModelOutputWithPast),
                         (SophiaCausalLMOutput, InternVLCausalLMOutputWithPast)):
        names = [f.name for f in dataclasses.fields(ours)]
        assert issubclass(ours, theirs) and names[:len(dataclasses.fields(theirs))] == [
            f.name for f in dataclasses.fields(theirs)]


def test_importing_the_package_registers_the_auto_classes():
    code = ("import swift_sophia\nfrom transformers import AutoConfig, AutoModel, AutoModelForImageTextToText\n"
            "cfg = AutoConfig.for_model('sophia')\n"
            "assert AutoModel._model_mapping[type(cfg)].__name__ == 'SophiaModel'\n"
            "assert AutoModelForImageTextToText._model_mapping[type(cfg)].__name__ == "
            "'SophiaForConditionalGeneration'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_checkpoint_without_the_pruner_gets_a_fresh_pruner(tiny_model_dir, tmp_path):
    """An InternVL checkpoint has no model.pruner.*: the Gumbel schedule starts at step 0 (tau_start) and the
    query MLP is initialised as in a freshly built model (identity mapping, Kaiming first layer)."""
    import shutil

    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_model_dir}/{name}", tmp_path / name)
    weights = load_file(f"{tiny_model_dir}/model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.pruner.")},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for _ in range(3):  # the uninitialised buffer was whatever memory held
        pruner = SophiaForConditionalGeneration.from_pretrained(tmp_path).model.pruner
        assert int(pruner.gumbel.step) == 0
        assert pruner.temperature(advance=False) == pytest.approx(pruner.gumbel.tau_start)
        first, last = pruner.query_mlp[0], pruner.query_mlp[2]
        d = first.weight.shape[1]
        bound = 1.0 / d ** 0.5  # kaiming_uniform(a=sqrt(5)), as nn.Linear and a fresh FramePruner use
        assert first.weight.abs().max() <= bound and first.weight.std() > 0.8 * bound / 3 ** 0.5
        assert torch.count_nonzero(last.weight) == 0 and torch.count_nonzero(first.bias) == 0


def test_saved_pruner_and_schedule_survive_reloading(tiny_model_dir, tmp_path):
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.pruner.query_mlp[2].weight.normal_()
    model.model.pruner.gumbel.set_step(1234)
    model.save_pretrained(tmp_path)
    again = SophiaForConditionalGeneration.from_pretrained(tmp_path)
    assert int(again.model.pruner.gumbel.step) == 1234
    torch.testing.assert_close(again.model.pruner.query_mlp[2].weight, model.model.pruner.query_mlp[2].weight)


@pytest.mark.parametrize("arity", [0, 1])
def test_config_and_layout_agree_on_the_arity(arity):
    """The config rejected hier_arity < 2 while the kernel's layout took 1: both reject it now, with one message."""
    from sophia_kernels import HierLayout, level_counts
    from swift_sophia.model.configuration_sophia import SophiaConfig

    with pytest.raises(ValueError, match="must be >= 2"):
        SophiaConfig(hier_arity=arity)
    with pytest.raises(ValueError, match="must be >= 2"):
        HierLayout.from_lists([(0, 0, 8)], [(0, 0, 2)], 4, arity, 2, 1)
    with pytest.raises(ValueError, match="must be >= 2"):
        level_counts(4, arity, 3)
