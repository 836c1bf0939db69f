"""What makes hour-long inputs fit is exact: the prefill cache, the chunked vision tower, the chunked position-wise
decoder layers and the label-position loss give what the plain computation gives."""
import pytest
import torch
from transformers import AutoTokenizer

from helpers import left_pad, video_prompt
from swift_sophia.model import attention, modeling_sophia
from swift_sophia.model.extended_sequence import build_extended_plan, find_video_runs
from swift_sophia.model.kv_cache import PrefillCache, cache_index
from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _model(tiny_model_dir, **config):
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir)
    for key, value in config.items():
        setattr(model.config, key, value)
    return model


def _batch(model, tokenizer, frames=(6, 3), seed=0):
    m = model.config.tokens_per_frame
    rows = [video_prompt(tokenizer, f, m, after=f"Shot {i}?<|im_end|>\n<|im_start|>assistant\nred") for i, f in
            enumerate(frames)]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=ids, attention_mask=mask,
                pixel_values_videos=torch.randn(sum(frames), 3, 56, 56, generator=g),
                video_frame_counts=torch.tensor(frames))


def _labels(inputs, answer=3):
    labels = inputs["input_ids"].clone()
    labels[:, :-answer] = -100
    return labels


class RecordingCache(PrefillCache):
    """Records what every layer's prefill update received and how much it stored."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received, self.stored_after_prefill = {}, []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        prefill = self._prefill_index is not None
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if prefill:
            self.received[layer_idx] = (key_states, value_states)
            self.stored_after_prefill.append(self.layers[layer_idx].keys.shape[2])
        return out


def test_prefill_cache_holds_exactly_the_text_and_level0_keys(tiny_model_dir, tokenizer, monkeypatch):
    import swift_sophia.model.modeling_sophia as modeling

    model = _model(tiny_model_dir).eval()
    inputs = _batch(model, tokenizer)
    monkeypatch.setattr(modeling, "PrefillCache", RecordingCache)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, RecordingCache)
    # Every layer stored only the plain-sequence tokens (no aggregated frame), never the extended sequence.
    plain = inputs["attention_mask"].sum(1)
    layers = model.config.text_config.num_hidden_layers
    assert cache.stored_after_prefill == [int(plain.max())] * layers
    m = model.config.tokens_per_frame
    is_video = inputs["input_ids"] == model.config.video_token_id
    runs = find_video_runs(is_video, inputs["video_frame_counts"].tolist(), m)
    plan = build_extended_plan(is_video, inputs["attention_mask"], None, runs, tokens_per_frame=m,
                               arity=model.config.hier_arity, levels=model.config.hier_levels,
                               neighbours=model.config.hier_neighbours)
    assert all(k.shape[2] == plan.length for k, _ in cache.received.values())
    index, mask = cache_index(plan.cache_keep)
    torch.testing.assert_close(out.cache_attention_mask, mask)
    for layer_idx, (keys, values) in cache.received.items():
        gather = index[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
        torch.testing.assert_close(cache.layers[layer_idx].keys, torch.gather(keys, 2, gather), rtol=0, atol=0)
        torch.testing.assert_close(cache.layers[layer_idx].values, torch.gather(values, 2, gather), rtol=0, atol=0)
    # Decoding appends to it as to any cache.
    with torch.no_grad():
        step = model(input_ids=inputs["input_ids"][:, -1:], past_key_values=cache,
                     attention_mask=torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1),
                     position_ids=out.next_position_ids[:, None])
    assert step.past_key_values.get_seq_length() == int(plain.max()) + 1


def test_generation_from_the_prefill_cache_equals_full_recomputation(tiny_model_dir, tokenizer):
    model = _model(tiny_model_dir).eval()
    inputs = _batch(model, tokenizer, frames=(7, 2))
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        full = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def test_inference_frees_the_decoder_input_after_the_first_layer_and_writes_attention_over_q(tiny_model_dir,
                                                                                              tokenizer, monkeypatch):
    """At inference the extended embeddings are freed once layer 0 has read them and each layer's attention output
    overwrites its query tensor (two [tokens x hidden] tensors less at the peak); with autograd both stay as they
    are. The logits are the same either way. (The decoder's own forward: decoders the lean prefill does not take,
    and lean_prefill=False.)"""
    model = _model(tiny_model_dir, lean_prefill=False).eval()
    inputs = _batch(model, tokenizer, frames=(6, 3))
    layers = model.model.language_model.layers
    seen, over_q = {}, []
    layers[0].register_forward_pre_hook(lambda m, args, kwargs: seen.update(
        input=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    layers[1].register_forward_pre_hook(lambda m, args, kwargs: seen.update(
        input_bytes_in_layer_1=seen["input"].untyped_storage().nbytes()), with_kwargs=True)
    kernel = attention.hierarchical_attention

    def recording(q, k, v, layout, out=None, **kw):
        over_q.append(out is q)
        return kernel(q, k, v, layout, out=out, **kw)

    monkeypatch.setattr(attention, "hierarchical_attention", recording)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert seen["input_bytes_in_layer_1"] == 0
    assert over_q == [True] * len(layers)

    seen.clear(), over_q.clear()
    with torch.enable_grad():
        logits_with_autograd = model(**inputs).logits
    assert seen["input_bytes_in_layer_1"] > 0
    assert over_q == [False] * len(layers)
    torch.testing.assert_close(logits_with_autograd.detach(), logits, rtol=0, atol=0)


@pytest.mark.parametrize("freeze_vit", [True, False])
def test_chunked_vision_tower_is_exact(tiny_model_dir, tokenizer, freeze_vit):
    inputs = _batch(_model(tiny_model_dir), tokenizer, frames=(7, 3))
    results = []
    for chunk in (0, 2):
        model = _model(tiny_model_dir, vision_chunk_frames=chunk).train()
        model.model.vision_tower.requires_grad_(not freeze_vit)
        out = model(**inputs, labels=_labels(inputs))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys()
    assert any(n.startswith("model.vision_tower.") for n in grads0) == (not freeze_vit)
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_vision_tower_runs_one_chunk_at_a_time(tiny_model_dir, tokenizer):
    model = _model(tiny_model_dir, vision_chunk_frames=3).eval()
    sizes = []
    model.model.vision_tower.register_forward_pre_hook(lambda mod, args, kwargs: sizes.append(
        kwargs["pixel_values"].shape[0]), with_kwargs=True)
    with torch.no_grad():
        model(**_batch(model, tokenizer, frames=(7, 3)))
    assert sizes == [3, 3, 3, 1]


def test_chunked_decoder_layers_are_exact_in_inference_and_training(tiny_model_dir, tokenizer):
    inputs = _batch(_model(tiny_model_dir), tokenizer, frames=(6, 3))
    text = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    results = {}
    for chunk in (0, 5):
        model = _model(tiny_model_dir, decoder_chunk_tokens=chunk)
        with torch.no_grad():
            logits = [model.eval()(**batch).logits for batch in (inputs, text)]
        model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = model(**inputs, labels=_labels(inputs)).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[chunk] = (logits, loss.detach(), grads, list(model.state_dict()))
    (logits0, loss0, grads0, keys0), (logits1, loss1, grads1, keys1) = results[0], results[5]
    for a, b in zip(logits0, logits1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss1, loss0)
    assert keys0 == keys1  # checkpoint keys unchanged
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_decoder_layers_run_one_chunk_at_a_time_and_keep_lora_targets(tiny_model_dir, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = _model(tiny_model_dir, decoder_chunk_tokens=16).eval()
    mlp = model.model.language_model.layers[0].mlp
    rows = []
    mlp.gate_proj.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[1]))
    inputs = _batch(model, tokenizer, frames=(6,))
    with torch.no_grad():
        model(**inputs)
    assert max(rows) == 16 and len(rows) > 1
    # Rotary embeddings too: the decoder's own function runs on chunks inside Sophia's step.
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    lengths = []
    original = qwen2.apply_rotary_pos_emb.__wrapped__
    qwen2.apply_rotary_pos_emb.__wrapped__ = original  # (functools.wraps keeps the original reachable)
    from swift_sophia.model import chunking

    chunked = chunking._chunked_rotary(lambda q, k, cos, sin: lengths.append(q.shape[2]) or original(q, k, cos, sin))
    real, qwen2.apply_rotary_pos_emb = qwen2.apply_rotary_pos_emb, chunked
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        qwen2.apply_rotary_pos_emb = real
    assert lengths and max(lengths) == 16
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]))
    lora.eval()
    with torch.no_grad():
        lora(**inputs)  # LoRA layers inside the chunked MLP run
    assert any("gate_proj.lora_A" in n for n, _ in lora.named_parameters())


@pytest.mark.parametrize("with_video", [True, False])
def test_label_position_loss_equals_the_full_loss(tiny_model_dir, tokenizer, with_video):
    model = _model(tiny_model_dir).train()
    inputs = _batch(model, tokenizer)
    if not with_video:
        inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    labels = _labels(inputs, answer=4)
    out = model(**inputs, labels=labels)
    assert out.logits is None  # training: no [tokens x vocab] tensor
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # Full computation: every position's logits, then transformers' causal-LM loss.
    full = model(**inputs, logits_to_keep=inputs["input_ids"].shape[1])
    reference = model.loss_function(logits=full.logits, labels=labels, vocab_size=model.config.text_config.vocab_size)
    reference.backward()
    torch.testing.assert_close(out.loss, reference)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    # num_items_in_batch (gradient accumulation): the sum over label tokens divided by it.
    summed = model(**inputs, labels=labels, num_items_in_batch=10).loss
    torch.testing.assert_close(summed, reference * int((labels[:, 1:] != -100).sum()) / 10)


@pytest.mark.parametrize("full_logits", [False, True])
def test_shift_labels_are_the_targets_of_every_loss_path(tiny_model_dir, tokenizer, full_logits):
    """transformers' `shift_labels` (already-shifted targets: context / sequence parallelism): the loss from them
    equals the loss from `labels` when they agree and follows them when they differ, on the label-position path
    (which also gives `token_loss`, each position's cross-entropy, 0 where there is no target) and on the full-logits
    path (`logits_to_keep`)."""
    model = _model(tiny_model_dir).train()
    inputs = _batch(model, tokenizer)
    labels = _labels(inputs, answer=4)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    other = shifted.clone()
    other[other != -100] = (other[other != -100] + 1) % model.config.text_config.vocab_size
    keep = dict(logits_to_keep=inputs["input_ids"].shape[1]) if full_logits else {}
    full = model(**inputs, logits_to_keep=inputs["input_ids"].shape[1]).logits.float()
    for targets in (shifted, other):
        per_position = torch.nn.functional.cross_entropy(full.transpose(1, 2), targets, reduction="none")
        out = model(**inputs, shift_labels=targets, **keep)
        torch.testing.assert_close(out.loss, per_position.sum() / (targets != -100).sum())
        if not full_logits:
            assert out.logits is None  # training: no [tokens x vocab] tensor
            torch.testing.assert_close(out.token_loss, per_position)
            assert (out.token_loss[targets == -100] == 0).all() and (out.token_loss[targets != -100] > 0).all()
    from_labels = model(**inputs, labels=labels, **keep).loss
    torch.testing.assert_close(model(**inputs, labels=labels, shift_labels=shifted, **keep).loss, from_labels)
    assert not torch.allclose(model(**inputs, labels=labels, shift_labels=other, **keep).loss, from_labels)


def test_label_position_loss_in_eval_returns_all_logits(tiny_model_dir, tokenizer):
    model = _model(tiny_model_dir).eval()
    inputs = _batch(model, tokenizer)
    with torch.no_grad():
        out = model(**inputs, labels=_labels(inputs))
    assert out.logits.shape[:2] == inputs["input_ids"].shape


def test_the_hierarchy_is_never_replaced_by_a_plain_mask(tiny_model_dir, tokenizer):
    """Inside a step over videos the mask function returns None (the kernel's rule), outside the user's mask."""
    model = _model(tiny_model_dir)
    config = model.model.language_model.config
    assert attention.is_installed(config)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    fn = ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]
    with attention.hierarchical_step():
        assert fn(batch_size=1, cache_position=torch.arange(4), kv_length=4) is None


@pytest.mark.parametrize("pruning", [False, True])
def test_every_batch_kind_calls_each_module_once_and_reaches_every_gradient(tiny_model_dir, tokenizer, pruning,
                                                                            monkeypatch):
    """What a multi-process run (DDP, ZeRO-2/3) needs of a step: whatever a rank's batch holds (videos of different
    lengths, a one-frame video, text only), the embedding, the vision tower, the pruner's query MLP (pruning on),
    the aggregator and the decoder run once each, and every trainable parameter gets a gradient (the query MLP
    runs on a zero token when pruning is off, so that DDP sees its gradients on every rank)."""
    model = _model(tiny_model_dir, prune_alpha=30.0 * pruning, prune_beta=30.0 * pruning).train()
    monkeypatch.setattr(type(model.model), "_distributed_training", lambda self: self.training)
    m = model.config.tokens_per_frame
    modules = {"embed": model.get_input_embeddings(), "vision": model.model.vision_tower,
               "query_mlp": model.model.pruner.query_mlp, "aggregator": model.model.aggregator,
               "decoder": model.model.language_model}
    trainable = [n for n, p in model.named_parameters()
                 if n.startswith(("model.aggregator.", "model.multi_modal_projector.", "model.pruner."))]
    for frames in ((6, 3), (1,), ()):
        if frames:
            inputs = _batch(model, tokenizer, frames=frames)
            query = torch.tensor([tokenizer.encode("What color?")] * len(frames))
            inputs.update(video_frame_shots=torch.cat([torch.arange(f) // 2 for f in frames]),
                          video_query_ids=query, video_query_mask=torch.ones_like(query))
        else:
            inputs = dict(input_ids=torch.tensor([tokenizer.encode("hello there, how are you?")]))
        calls = {name: 0 for name in modules}
        handles = [mod.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
                   for name, mod in modules.items()]
        model.zero_grad()
        model(**inputs, labels=_labels(inputs)).loss.backward()
        for h in handles:
            h.remove()
        expected = dict(embed=1, vision=1, query_mlp=1, aggregator=1, decoder=1)
        assert calls == expected, (frames, calls)
        missing = [n for n in trainable if dict(model.named_parameters())[n].grad is None]
        assert not missing, (frames, missing)
    del m


@pytest.mark.parametrize("reentrant", [False, True])
def test_offloaded_checkpoints_train_exactly_with_every_layer_input_on_the_host(tiny_model_dir, tokenizer,
                                                                                monkeypatch, reentrant):
    """`offload_checkpoints` (ms-swift's default use_reentrant=True and torch's False): the same loss and gradients,
    and what the recompute keeps of each decoder layer (its [tokens x hidden] input) waits in host memory."""
    import transformers.modeling_utils as modeling_utils

    hidden = _model(tiny_model_dir).config.text_config.hidden_size
    offloaded = []

    class RecordingSaveOnCpu(modeling_utils.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            def pack(tensor):
                offloaded.append(tuple(tensor.shape))
                return tensor.device, tensor.cpu()

            torch.autograd.graph.saved_tensors_hooks.__init__(self, pack, lambda packed: packed[1].to(packed[0]))

    monkeypatch.setattr(modeling_utils, "save_on_cpu", RecordingSaveOnCpu)
    monkeypatch.setattr(modeling_sophia, "_has_accelerator", lambda: True)  # as on a GPU machine
    inputs = _batch(_model(tiny_model_dir), tokenizer, frames=(6, 3))
    results = {}
    for offload in (False, True):
        model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir, offload_checkpoints=offload).train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        loss = model(**inputs, labels=_labels(inputs)).loss
        loss.backward()
        results[offload] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    layers = model.config.text_config.num_hidden_layers
    assert len([s for s in offloaded if len(s) == 3 and s[0] == 2 and s[-1] == hidden]) == layers, offloaded
    (loss0, grads0), (loss1, grads1) = results[False], results[True]
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=0, msg=name)


@pytest.mark.skipif(torch.accelerator.current_accelerator() is not None, reason="what a machine without a GPU does")
def test_offloaded_checkpoints_without_a_gpu_train_as_without_offloading(tiny_model_dir, tokenizer):
    """Nothing to move off a device and no pinned memory without one: the step runs (it failed asking for pinned
    memory) with the same loss as without the setting."""
    inputs = _batch(_model(tiny_model_dir), tokenizer, frames=(6, 3))
    losses = []
    for offload in (False, True):
        model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir, offload_checkpoints=offload).train()
        model.gradient_checkpointing_enable()
        loss = model(**inputs, labels=_labels(inputs)).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)


def test_offload_checkpoints_is_a_runtime_setting(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SOPHIA_OFFLOAD_CHECKPOINTS", "1")
    assert SophiaForConditionalGeneration.from_pretrained(tiny_model_dir).config.offload_checkpoints is True


def test_int8_quantization_error_is_within_half_a_step():
    from swift_sophia.model.kv_cache import dequantize_int8, quantize_int8

    x = torch.randn(2, 3, 50, 16, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 50)[:, None]
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.shape == (2, 3, 50, 1)
    assert ((dequantize_int8(q, scale) - x).abs() <= scale / 2 + 1e-6 * x.abs()).all()
    assert torch.equal(quantize_int8(dequantize_int8(q, scale))[0], q)  # requantizing changes nothing


@pytest.mark.parametrize("lean", [True, False])
def test_int8_kv_cache_stores_int8_and_keeps_generation_close(tiny_model_dir, tokenizer, monkeypatch, lean):
    """kv_cache_bits=8: the prefill cache holds int8 keys and values (a quarter of float32's bytes and the scales),
    the latest tokens move into it every `residual_length` steps, and every step's logits stay within 2 % of the
    full-precision cache's (relative norm), a padded batch of two videos."""
    from swift_sophia.model import kv_cache

    monkeypatch.setattr(kv_cache.Int8KVLayer.__init__, "__defaults__", (3,))  # requantize during the test
    results = {}
    for bits in (16, 8):
        model = _model(tiny_model_dir, kv_cache_bits=bits, lean_prefill=lean).eval()
        inputs = _batch(model, tokenizer, frames=(7, 2))
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                                 output_scores=True)
        results[bits] = (out.sequences, torch.stack(out.scores), out.past_key_values)
    (seq16, scores16, cache16), (seq8, scores8, cache8) = results[16], results[8]
    layer = cache8.layers[0]
    assert isinstance(layer, kv_cache.Int8KVLayer) and layer._quantized_keys[0].dtype == torch.int8
    assert cache8.get_seq_length() == cache16.get_seq_length()
    full = cache16.layers[0].keys
    stored = layer._quantized_keys[0].numel() + layer._quantized_keys[1].numel() * 4 + layer.keys.numel() * 4
    assert stored < 0.35 * full.numel() * 4
    error = (scores8 - scores16).norm(dim=-1) / scores16.norm(dim=-1)
    assert error.max() < 2e-2, error
    assert torch.equal(seq8[:, :inputs["input_ids"].shape[1] + 2], seq16[:, :inputs["input_ids"].shape[1] + 2])


def test_kv_cache_bits_setting(tiny_model_dir, monkeypatch):
    from swift_sophia.model.frame_budget import bytes_per_kept_frame
    from swift_sophia.tools.shapes import shape_config

    monkeypatch.setenv("SOPHIA_KV_CACHE_BITS", "8")
    assert _model(tiny_model_dir).config.kv_cache_bits == 8
    monkeypatch.setenv("SOPHIA_KV_CACHE_BITS", "4")
    with pytest.raises(ValueError, match="kv_cache_bits=4 is not valid.*SOPHIA_KV_CACHE_BITS"):
        _model(tiny_model_dir)
    monkeypatch.delenv("SOPHIA_KV_CACHE_BITS")
    config = shape_config("internvl2.5-8b")
    full = bytes_per_kept_frame(config)
    config.kv_cache_bits = 8
    assert full - bytes_per_kept_frame(config) == pytest.approx(16 * 2**20 - 256 * 32 * 2 * 8 * 2)
