"""SophiaForConditionalGeneration on the tiny config: save/load, the extended sequence, generation, errors."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText, AutoTokenizer

from helpers import left_pad, video_prompt
from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration
from swift_sophia.tools.tiny import build_tiny


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _batch(tokenizer, model, frames=(5, 3), seed=0):
    m = model.config.tokens_per_frame
    rows = [video_prompt(tokenizer, f, m, after=f"What color is shot {i}?<|im_end|>\n<|im_start|>assistant\n")
            for i, f in enumerate(frames)]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(sum(frames), 3, 56, 56, generator=g)
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels,
                video_frame_counts=torch.tensor(frames))


def test_save_and_reload_with_auto_classes(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(again) is SophiaForConditionalGeneration
    inputs = _batch(tokenizer, model)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, again(**inputs).logits)


def test_decoder_routes_attention_through_sophia(model_and_tokenizer):
    from swift_sophia.model.attention import is_installed

    model, _ = model_and_tokenizer
    config = model.model.language_model.config
    assert config._attn_implementation == "sdpa" and is_installed(config)  # the user's choice, routed


def test_generate_with_cache_equals_full_recomputation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    inputs = _batch(tokenizer, model, frames=(6, 1))
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        full = model.generate(**inputs, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def test_prefill_drops_aggregated_tokens_from_cache(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    inputs = _batch(tokenizer, model, frames=(6, 3))
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    plain_tokens = inputs["attention_mask"].sum(1)
    # Without pruning the compacted cache holds exactly the plain tokens of each row, right-aligned.
    assert out.past_key_values.get_seq_length() == inputs["input_ids"].shape[1]
    assert torch.equal(out.cache_attention_mask.sum(1), plain_tokens)
    assert torch.equal(out.next_position_ids, plain_tokens)


def test_logits_line_up_with_the_plain_sequence(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    inputs = _batch(tokenizer, model)
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = -100
    out = model(**inputs, labels=labels)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(),
                                               labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


def test_text_never_reads_aggregated_tokens(tiny_model_dir):
    """With one decoder layer, text outputs depend on aggregated frames only through attention: none allowed."""
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    model.model.language_model.layers = model.model.language_model.layers[:1]
    model.model.language_model.config.num_hidden_layers = 1
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    inputs = _batch(tokenizer, model, frames=(8,))
    video = inputs["input_ids"] == model.config.video_token_id
    with torch.no_grad():
        before = model(**inputs).logits
        model.model.aggregator.weight.mul_(-3.0).add_(0.5)
        after = model(**inputs).logits
    torch.testing.assert_close(before[~video], after[~video])
    assert not torch.allclose(before[video], after[video])


def test_one_frame_video_and_text_only_and_images(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with torch.no_grad():
        # A one-frame video (a trapezoid of one level): cached generation equals full recomputation.
        one = _batch(tokenizer, model, frames=(1,))
        cached = model.generate(**one, max_new_tokens=4, do_sample=False)
        assert torch.equal(cached, model.generate(**one, max_new_tokens=4, do_sample=False, use_cache=False))
        # Text only: exactly the bare decoder and LM head.
        text = tokenizer("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", return_tensors="pt")
        bare = model.lm_head(model.model.language_model(input_ids=text["input_ids"]).last_hidden_state)
        torch.testing.assert_close(model(**text).logits, bare, rtol=0, atol=0)
        # An image: its features replace the placeholder embeddings, then plain causal attention.
        img = tokenizer.convert_tokens_to_ids(["<img>", "<IMG_CONTEXT>", "</img>"])
        ids = torch.tensor([[img[0]] + [img[1]] * model.config.tokens_per_frame + [img[2]]
                            + tokenizer.encode("shape?")])
        pixels = torch.randn(1, 3, 56, 56)
        logits = model(input_ids=ids, pixel_values=pixels).logits
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == img[1]] = model.model.video_frame_features(pixels).reshape(-1, embeds.shape[-1])
        manual = model.lm_head(model.model.language_model(inputs_embeds=embeds).last_hidden_state)
        torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)
        other = model(input_ids=ids, pixel_values=torch.randn(1, 3, 56, 56)).logits
        assert not torch.allclose(other[0, -1], logits[0, -1])


def test_llama_decoder(tmp_path):
    path = build_tiny(str(tmp_path / "llama"), decoder="llama")
    model = SophiaForConditionalGeneration.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.text_config.model_type == "llama"
    inputs = _batch(tokenizer, model, frames=(4, 2))
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        full = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def test_mismatched_video_inputs_raise_clear_errors(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    inputs = _batch(tokenizer, model, frames=(5, 3))
    with pytest.raises(ValueError, match="2 runs of video placeholder tokens but 3 videos"):
        model(**dict(inputs, video_frame_counts=torch.tensor([4, 3, 1])))
    with pytest.raises(ValueError, match="expected 4 frames"):
        model(**dict(inputs, video_frame_counts=torch.tensor([4, 4])))
    truncated = dict(inputs, input_ids=inputs["input_ids"][:, :-20], attention_mask=inputs["attention_mask"][:, :-20])
    with pytest.raises(ValueError, match="truncated"):
        model(**truncated)


def test_training_step_reaches_every_new_module(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model = SophiaForConditionalGeneration(model.config).train()
    inputs = _batch(tokenizer, model)
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    model(**inputs, labels=labels).loss.backward()
    for name in ("model.aggregator.weight", "model.multi_modal_projector.linear_1.weight",
                 "model.vision_tower.embeddings.patch_embeddings.projection.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def _with_shots_and_query(inputs, tokenizer, shots_per_video):
    ids = []
    for frames, shots in zip(inputs["video_frame_counts"].tolist(), shots_per_video):
        per = -(-frames // shots)
        ids.append(torch.arange(frames) // per)
    query = torch.tensor([tokenizer.encode("What color is the first shot?")] * len(shots_per_video))
    return dict(inputs, video_frame_shots=torch.cat(ids), video_query_ids=query,
                video_query_mask=torch.ones_like(query))


def test_pruning_keeps_fewer_frames_and_generation_stays_consistent(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    inputs = _with_shots_and_query(_batch(tokenizer, model, frames=(8, 6)), tokenizer, (4, 3))
    with torch.no_grad():
        unpruned = model(**inputs)
        monkeypatch.setattr(model.config, "prune_alpha", 50.0)
        monkeypatch.setattr(model.config, "prune_beta", 50.0)
        pruned = model(**inputs, use_cache=True)
        assert [len(k) for k in unpruned.kept_frames] == [8, 6]
        kept = [len(k) for k in pruned.kept_frames]
        assert kept[0] < 8 and kept[1] < 6 and min(kept) >= 1
        # The cache holds the plain tokens minus the pruned frames' tokens.
        m = model.config.tokens_per_frame
        dropped = torch.tensor([(8 - kept[0]) * m, (6 - kept[1]) * m])
        assert torch.equal(pruned.cache_attention_mask.sum(1), inputs["attention_mask"].sum(1) - dropped)
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        full = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def test_pruning_settings_come_from_the_environment_once_at_load(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PRUNE_ALPHA", "30")
    monkeypatch.setenv("PRUNE_BETA", "20")
    model = SophiaForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert (model.config.prune_alpha, model.config.prune_beta) == (30.0, 20.0)
    monkeypatch.setenv("PRUNE_ALPHA", "abc")
    with pytest.raises(ValueError, match="PRUNE_ALPHA='abc'"):
        SophiaForConditionalGeneration.from_pretrained(tiny_model_dir)


def test_zero_alpha_and_beta_is_exactly_the_unpruned_model(model_and_tokenizer, monkeypatch):
    model, tokenizer = model_and_tokenizer
    inputs = _with_shots_and_query(_batch(tokenizer, model, frames=(8,)), tokenizer, (4,))
    monkeypatch.setattr(model.config, "prune_alpha", 0.0)
    monkeypatch.setattr(model.config, "prune_beta", 0.0)
    with torch.no_grad():
        plain = _batch(tokenizer, model, frames=(8,))
        torch.testing.assert_close(model(**inputs).logits, model(**plain).logits, rtol=0, atol=0)


def test_checkpoint_without_new_modules_initialises_them(tiny_model_dir, tmp_path):
    """An InternVL-style checkpoint lacks the aggregation CNN and the pruner: they get their documented init."""
    import shutil

    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_model_dir}/{name}", tmp_path / name)
    weights = load_file(f"{tiny_model_dir}/model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith(("model.aggregator.", "model.pruner."))},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = SophiaForConditionalGeneration.from_pretrained(tmp_path)
    agg = model.model.aggregator
    d = agg.weight.shape[1]
    expected = torch.eye(d)[None, :, :, None].expand_as(agg.weight) / agg.arity
    torch.testing.assert_close(agg.weight.detach(), expected)
    assert torch.count_nonzero(agg.bias) == 0
    q = torch.randn(3, d)
    torch.testing.assert_close(model.model.pruner.map_query(q), q)


def test_packed_row_equals_separate_sequences(model_and_tokenizer):
    """ms-swift's padding_free packs samples into one row with position_ids restarting at 0 and no mask."""
    model, tokenizer = model_and_tokenizer
    m = model.config.tokens_per_frame
    rows = [video_prompt(tokenizer, 5, m), video_prompt(tokenizer, 2, m, after="Shape?<|im_end|>\n")]
    pixels = torch.randn(7, 3, 56, 56)
    packed = dict(input_ids=torch.tensor([rows[0] + rows[1]]),
                  position_ids=torch.tensor([list(range(len(rows[0]))) + list(range(len(rows[1])))]),
                  pixel_values_videos=pixels, video_frame_counts=torch.tensor([5, 2]))
    with torch.no_grad():
        together = model(**packed).logits[0]
        first = model(input_ids=torch.tensor([rows[0]]), pixel_values_videos=pixels[:5],
                      video_frame_counts=torch.tensor([5])).logits[0]
        second = model(input_ids=torch.tensor([rows[1]]), pixel_values_videos=pixels[5:],
                       video_frame_counts=torch.tensor([2])).logits[0]
    torch.testing.assert_close(together, torch.cat([first, second]), rtol=1e-4, atol=1e-4)


def test_decoding_never_runs_the_hierarchical_kernel(model_and_tokenizer, monkeypatch):
    """After prefill, each generated token is plain causal attention over text and level-0 tokens."""
    import swift_sophia.model.attention as sophia_attention
    import swift_sophia.model.lean_prefill as lean_prefill

    model, tokenizer = model_and_tokenizer
    calls = []
    real = sophia_attention.hierarchical_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(sophia_attention, "hierarchical_attention", counting)  # the decoder's own forward
    monkeypatch.setattr(lean_prefill, "hierarchical_attention", counting)  # the lean prefill
    with torch.no_grad():
        model.generate(**_batch(tokenizer, model, frames=(6,)), max_new_tokens=5, do_sample=False)
    layers = model.config.text_config.num_hidden_layers
    assert len(calls) == layers  # the prefill only, once per layer


def _stage_3(model_and_tokenizer):
    """Stage 3's settings on a copy of the tiny config (half the shots dropped, a constant Gumbel temperature), two
    videos with shots and a query, and labels on the last tokens."""
    model, tokenizer = model_and_tokenizer
    config = copy.deepcopy(model.config)
    config.prune_alpha, config.prune_beta, config.gumbel_anneal_rate = 50.0, 0.0, 0.0
    inputs = _with_shots_and_query(_batch(tokenizer, model, frames=(8, 6)), tokenizer, (4, 3))
    labels = inputs["input_ids"].clone()
    labels[:, :-3] = -100
    return config, inputs, labels


def test_stage_3_gates_scale_what_the_sequence_reads_from_a_kept_shot(model_and_tokenizer):
    """In training with Gumbel gates, the gradient that reaches a kept shot's gate is the loss's sensitivity to the
    values every decoder layer reads from that shot's tokens (how much the answer depends on reading the shot), not
    to the size of its input features, which the decoder's first norm removes. Checked against central differences
    that scale the shot's rows of every layer's value projection."""
    config, inputs, labels = _stage_3(model_and_tokenizer)
    torch.manual_seed(0)
    model = SophiaForConditionalGeneration(config).double().train()  # float64: differences of a loss near 10
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].double()
    seen, embeds = [], []
    select = model.model.pruner.select

    def recording_select(*args, **kwargs):
        seen.append((args[0], select(*args, **kwargs)))
        return seen[-1][1]

    model.model.pruner.select = recording_select
    model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: embeds.append(kwargs["inputs_embeds"].detach()), with_kwargs=True)

    def loss():
        seen.clear()
        torch.manual_seed(0)  # the same Gumbel noise, so the same frames, in every pass
        logits = model(**inputs).logits
        assert logits.dtype == torch.float64
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)

    gate_grads = []
    value = loss()
    for _, selection in seen:
        selection.gate.register_hook(gate_grads.append)
    value.backward()
    gate_grads.reverse()  # the backward reaches the videos' gates last first
    selections, row_embeds = list(seen), embeds[0]
    scale = {"factor": 1.0, "row": 0, "positions": []}

    def scaled(module, args, out):
        out = out.clone()
        out[scale["row"], scale["positions"]] *= scale["factor"]
        return out

    hooks = [layer.self_attn.v_proj.register_forward_hook(scaled) for layer in model.model.language_model.layers]
    eps = 1e-2  # parts of the model compute in float32: smaller steps drown in its rounding
    checked = 0
    for row, ((frames, selection), grad) in enumerate(zip(selections, gate_grads)):  # one video per row
        for shot in selection.kept_shots.tolist():
            mine = selection.shot_of_frame[selection.keep] == shot
            analytic = float(grad[mine].sum())
            # the shot's rows of the extended sequence: the rows equal to its kept frames' features
            tokens = frames[selection.keep[mine]].reshape(-1, frames.shape[-1]).detach()
            scale.update(row=row, positions=[int(torch.nonzero((row_embeds[row] == t).all(dim=-1))[0])
                                             for t in tokens])
            scale["factor"] = 1 + eps
            up = float(loss())
            scale["factor"] = 1 - eps
            down = float(loss())
            scale["factor"] = 1.0
            numeric = (up - down) / (2 * eps)
            assert abs(numeric) > 1e-5
            assert analytic == pytest.approx(numeric, rel=1e-3), (row, shot)
            checked += 1
    for hook in hooks:
        hook.remove()
    assert checked == 3  # two kept shots of the first video (left of the padding), one of the second


def test_stage_3_releases_the_attention_values_after_the_backward(model_and_tokenizer):
    """The values each layer hands to stage 3's gate gradient are freed with the step, as any activation: at 100K
    tokens a step that kept them would hold gigabytes more with every step."""
    from swift_sophia.model.value_gates import ValueGateGradient

    config, inputs, labels = _stage_3(model_and_tokenizer)
    model = SophiaForConditionalGeneration(config).train()
    watched = []
    watch = ValueGateGradient.watch

    def recording_watch(self, value):
        watched.append(weakref.ref(value))
        return watch(self, value)

    ValueGateGradient.watch = recording_watch
    try:
        for _ in range(2):
            model(**inputs, labels=labels).loss.backward()
    finally:
        ValueGateGradient.watch = watch
    gc.collect()
    assert len(watched) == 2 * len(model.model.language_model.layers)
    assert all(ref() is None for ref in watched)


@pytest.mark.parametrize("reentrant", [True, False])
def test_stage_3_pruner_gradient_is_the_same_with_gradient_checkpointing(model_and_tokenizer, reentrant):
    """ms-swift checkpoints the decoder layers by default, reentrant on one process and under DeepSpeed: stage 3's
    pruner gets the same gradient as without checkpointing."""
    config, inputs, labels = _stage_3(model_and_tokenizer)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SophiaForConditionalGeneration(config).train()
        with torch.no_grad():
            model.model.pruner.query_mlp[2].weight.normal_(0, 0.1)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("model.pruner."))  # stage 3: the pruner alone
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        torch.manual_seed(1)
        model(**inputs, labels=labels).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.model.pruner.query_mlp.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])
