"""The lean prefill (`lean_prefill.py`): at inference the decoder runs layer by layer over the extended sequence with
the residual updated in place; it must give exactly what the decoder's own forward gives."""
from unittest import mock

import pytest
import torch
from transformers import AutoTokenizer

from helpers import left_pad, video_prompt
from swift_sophia.model import modeling_sophia
from swift_sophia.model.lean_prefill import supports_lean_prefill
from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration


def _inputs(model, tokenizer, frames=(12, 5)):
    rows = [video_prompt(tokenizer, f, model.config.tokens_per_frame) for f in frames]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    return dict(input_ids=ids, attention_mask=mask, video_frame_counts=torch.tensor(frames),
                pixel_values_videos=torch.randn(sum(frames), 3, 56, 56, generator=torch.Generator().manual_seed(0)),
                video_query_ids=ids[:, -6:], video_query_mask=torch.ones(len(frames), 6, dtype=torch.long))


@pytest.mark.parametrize("chunk", [0, 16])
def test_lean_prefill_equals_the_decoders_forward(tiny_model_dir, chunk):
    """Padded batch of two videos, pruning on, the whole sequence at once or 16 tokens at a time: the same logits,
    bit for bit, and the same greedy generation from its cache."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir, decoder_chunk_tokens=chunk,
                                                           prune_alpha=30, prune_beta=30).eval()
    assert supports_lean_prefill(model.model.language_model)
    inputs = _inputs(model, tokenizer)
    results = {}
    for lean in (True, False):
        model.config.lean_prefill = lean
        with torch.no_grad(), mock.patch.object(modeling_sophia, "lean_prefill",
                                                wraps=modeling_sophia.lean_prefill) as spy:
            logits = model(**inputs).logits
            generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert spy.called == lean
        results[lean] = (logits, generated)
    assert torch.equal(results[True][0], results[False][0])
    assert torch.equal(results[True][1], results[False][1])


def test_training_hidden_states_and_other_decoders_take_the_decoders_forward(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir)
    inputs = _inputs(model, tokenizer)
    with mock.patch.object(modeling_sophia, "lean_prefill") as spy:
        model.train()(**inputs, labels=inputs["input_ids"])  # autograd: the decoder's forward
        with torch.no_grad():
            out = model.eval()(**inputs, output_hidden_states=True)
    assert not spy.called and len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1
    layer = model.model.language_model.layers[0]
    layer.self_attn.q_norm = torch.nn.Identity()  # per-head norms (Qwen3-style): not the Llama layout
    assert not supports_lean_prefill(model.model.language_model)
    del layer.self_attn.q_norm
    assert supports_lean_prefill(model.model.language_model)
    # a layer of another family (Gemma 2: four norms a layer), even with Llama's attribute names
    layer.__class__ = type("Gemma2DecoderLayer", (type(layer),), {})
    assert not supports_lean_prefill(model.model.language_model)


def test_a_prefill_for_the_next_token_gathers_only_the_last_positions(tiny_model_dir):
    """`logits_to_keep=1` (what generation asks): the head gets the last plain positions only, never the plain
    sequence's [tokens x hidden] (2.6 M tokens at 10,000 frames); the same logits as slicing the full ones."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    inputs = _inputs(model, tokenizer)
    with torch.no_grad():
        full = model(**inputs).logits
        with mock.patch.object(modeling_sophia, "_to_plain", wraps=modeling_sophia._to_plain) as spy:
            last = model(**inputs, logits_to_keep=2).logits
    assert spy.call_args.args[2] == 2 and last.shape[1] == 2
    torch.testing.assert_close(last, full[:, -2:], rtol=0, atol=0)
