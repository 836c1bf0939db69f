"""The model on a CUDA GPU: the Triton kernel inside the decoder agrees with the PyTorch reference, and
generation with the cache still equals full recomputation. Skipped without CUDA."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # A decoder with head dim 64 (hidden 256, 4 heads, 2 kv heads), the kernel's usual shape.
    return _build(tmp_path_factory)


def _build(tmp_path_factory):
    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration
    from swift_sophia.tools.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    config.text_config.hidden_size, config.text_config.intermediate_size = 256, 512
    config.text_config.num_attention_heads, config.text_config.num_key_value_heads = 4, 2
    config.text_config.head_dim = 64
    torch.manual_seed(0)
    model = SophiaForConditionalGeneration(config)
    path = str(tmp_path_factory.mktemp("tiny-gpu"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _inputs(tokenizer, model, frames=(16, 5)):
    from helpers import left_pad, video_prompt

    rows = [video_prompt(tokenizer, f, model.config.tokens_per_frame) for f in frames]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    # Seeded: two models compared on "the same inputs" must get the same pixels, not two draws of the global RNG.
    pixels = torch.randn(sum(frames), 3, 56, 56, generator=torch.Generator().manual_seed(0))
    return {k: v.cuda() for k, v in dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels,
                                         video_frame_counts=torch.tensor(frames)).items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_and_reference_backends_agree(tiny, dtype):
    from transformers import AutoTokenizer

    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = SophiaForConditionalGeneration.from_pretrained(tiny, dtype=dtype).cuda()
    inputs = _inputs(tokenizer, model)
    labels = inputs["input_ids"].clone()
    labels[:, :-4] = -100
    results = {}
    for backend in ("reference", "triton"):
        model.config.attention_backend = backend
        model.zero_grad()
        out = model(**inputs, labels=labels)
        out.loss.backward()
        grad = model.model.language_model.layers[0].self_attn.q_proj.weight.grad.float().clone()
        results[backend] = (out.logits.float(), grad)
    (ref_logits, ref_grad), (tri_logits, tri_grad) = results["reference"], results["triton"]
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    assert torch.isfinite(tri_logits).all() and torch.isfinite(tri_grad).all()
    assert (tri_logits - ref_logits).norm() / ref_logits.norm() < tol
    assert (tri_grad - ref_grad).norm() / ref_grad.norm() < tol * 5


def test_generate_on_gpu_with_cache_equals_recomputation(tiny):
    from transformers import AutoTokenizer

    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = SophiaForConditionalGeneration.from_pretrained(tiny).cuda().eval()
    assert model.config.attention_backend == "auto"
    inputs = _inputs(tokenizer, model)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        full = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def _assert_cached_generation_is_greedy(model, inputs, exact: bool, new_tokens: int = 6):
    """Greedy generation from the prefill's cache against recomputation without a cache. `exact`: the same tokens.
    Otherwise (Liger's kernels round a one-token decoding step and a many-token prefill differently in bf16, so
    near-ties may break either way): every step's scores within bf16 rounding of the recomputed logits of the same
    sequence, and every chosen token within that rounding of the recomputed best."""
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
        if exact:
            full = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, use_cache=False)
            assert torch.equal(cached.sequences, full)
            return
        sequences, prompt = cached.sequences, inputs["input_ids"].shape[1]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(sequences[:, prompt:])], dim=1)
        recomputed = model(**{**inputs, "input_ids": sequences, "attention_mask": mask}, use_cache=False).logits
    for step, scores in enumerate(cached.scores):
        full = recomputed[:, prompt - 1 + step].float()
        chosen = sequences[:, prompt + step]
        assert (scores.float() - full).abs().max() < 2e-2, f"step {step}"
        assert (full.max(-1).values - full.gather(1, chosen[:, None])[:, 0]).max() < 2e-2, f"step {step}"


def test_liger_kernels_agree_with_the_plain_decoder_in_inference_and_training(tiny):
    """Liger's RMSNorm, SwiGLU and RoPE (config liger_kernel, or `--use_liger_kernel true`) inside Sophia's
    chunked decoder, bf16 with the Triton attention kernel: logits, loss and gradients as without them, within
    bf16 rounding; generation with the cache still equals recomputation."""
    pytest.importorskip("liger_kernel")
    from transformers import AutoTokenizer
    from transformers.models.qwen2 import modeling_qwen2

    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    saved = {n: getattr(modeling_qwen2, n) for n in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP")}
    results = {}
    try:
        for liger in (False, True):
            model = SophiaForConditionalGeneration.from_pretrained(tiny, dtype=torch.bfloat16, liger_kernel=liger,
                                                                   decoder_chunk_tokens=32).cuda()
            inputs = _inputs(tokenizer, model)
            labels = inputs["input_ids"].clone()
            labels[:, :-4] = -100
            with torch.no_grad():  # logits where there are tokens (padding positions carry no prediction)
                logits = model.eval()(**inputs).logits.float()[inputs["attention_mask"].bool()]
            _assert_cached_generation_is_greedy(model, inputs, exact=not liger)
            model.train().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            grad = model.model.language_model.layers[0].mlp.gate_proj.weight.grad.float()
            results[liger] = (logits, loss.detach().float(), grad)
    finally:
        for name, value in saved.items():
            setattr(modeling_qwen2, name, value)
    (l0, loss0, g0), (l1, loss1, g1) = results[False], results[True]
    assert (l1 - l0).norm() / l0.norm() < 2e-2
    assert abs(float(loss1 - loss0)) < 2e-2 * abs(float(loss0))
    assert (g1 - g0).norm() / g0.norm() < 5e-2


@pytest.mark.parametrize("liger", [False, True])
def test_lean_prefill_agrees_with_the_decoders_forward(tiny, liger):
    """bf16, Triton attention, a padded batch, 32-token chunks (with Liger's kernels too): the lean prefill's logits
    within bf16 rounding of the decoder's own forward, and greedy generation from its cache equal to recomputation."""
    if liger:
        pytest.importorskip("liger_kernel")
    from transformers import AutoTokenizer
    from transformers.models.qwen2 import modeling_qwen2

    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    saved = {n: getattr(modeling_qwen2, n) for n in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP")}
    try:
        model = SophiaForConditionalGeneration.from_pretrained(tiny, dtype=torch.bfloat16, liger_kernel=liger,
                                                               decoder_chunk_tokens=32).cuda().eval()
        inputs = _inputs(tokenizer, model)
        logits = {}
        with torch.no_grad():
            for lean in (True, False):
                model.config.lean_prefill = lean
                logits[lean] = model(**inputs).logits.float()[inputs["attention_mask"].bool()]
            model.config.lean_prefill = True
        _assert_cached_generation_is_greedy(model, inputs, exact=not liger)
    finally:
        for name, value in saved.items():
            setattr(modeling_qwen2, name, value)
    assert (logits[True] - logits[False]).norm() / logits[False].norm() < 1e-2


def test_offloaded_checkpoints_give_the_same_gradients_with_layer_inputs_in_pinned_host_memory(tiny):
    """bf16 on the GPU, Triton attention: `offload_checkpoints` gives bit-identical loss and gradients, and each
    decoder layer's input (what the recompute needs) was copied to pinned host memory."""
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoTokenizer

    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    packed, real = [], modeling_utils.save_on_cpu

    class Recording(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook

            def recording_pack(tensor):
                out = pack(tensor)
                packed.append((tensor.device.type, out[1].device.type, out[1].is_pinned(), tuple(tensor.shape)))
                return out

            self.pack_hook = recording_pack

    results = {}
    modeling_utils.save_on_cpu = Recording
    try:
        for offload in (False, True):
            model = SophiaForConditionalGeneration.from_pretrained(
                tiny, dtype=torch.bfloat16, offload_checkpoints=offload, decoder_chunk_tokens=32).cuda().train()
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            inputs = _inputs(tokenizer, model)
            labels = inputs["input_ids"].clone()
            labels[:, :-4] = -100
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            results[offload] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    finally:
        modeling_utils.save_on_cpu = real
    hidden = model.config.text_config.hidden_size
    layer_inputs = [p for p in packed if len(p[3]) == 3 and p[3][-1] == hidden]
    assert len(layer_inputs) >= model.config.text_config.num_hidden_layers, packed
    assert all(p[:3] == ("cuda", "cpu", True) for p in layer_inputs), layer_inputs
    (loss0, grads0), (loss1, grads1) = results[False], results[True]
    assert torch.equal(loss1, loss0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        assert torch.equal(grads1[name], grads0[name]), name


@pytest.mark.parametrize("on_host", [False, True])
def test_feature_cache_follow_up_equals_the_uncached_prefill_on_gpu(tiny, monkeypatch, on_host):
    """bf16, Triton attention, pruning on: a follow-up question answered from cached features (copied off the GPU
    asynchronously, or kept in pinned host memory when the features wait there) gives the logits of the uncached
    prefill of the same question."""
    from transformers import AutoTokenizer

    import swift_sophia.model.modeling_sophia as modeling
    from swift_sophia.model.feature_cache import FeatureSlot, VideoFeatures
    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration

    if on_host:
        monkeypatch.setattr(modeling, "HOST_FEATURES_FROM_BYTES", 0)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = SophiaForConditionalGeneration.from_pretrained(tiny, dtype=torch.bfloat16, prune_alpha=30.0,
                                                           prune_beta=30.0).cuda().eval()
    inputs = _inputs(tokenizer, model)
    counts = inputs["video_frame_counts"].tolist()
    shots = torch.arange(sum(counts), device="cuda") // 4
    inputs.update(video_frame_shots=shots, video_query_ids=torch.tensor([[5, 6, 7], [8, 9, 10]], device="cuda"),
                  video_query_mask=torch.ones(2, 3, dtype=torch.long, device="cuda"))
    slots = [FeatureSlot(f"v{i}", f"v{i}", VideoFeatures(list(range(c)), c, 25.0)) for i, c in enumerate(counts)]
    with torch.no_grad():
        first = model(**inputs, video_feature_slots=slots).logits
        assert len(model.video_feature_cache) == 2
        hits = [FeatureSlot(s.key, s.name, model.video_feature_cache.get(s.key)) for s in slots]
        assert all(h.hit and h.entry.features.device.type == "cpu" for h in hits)
        follow = dict(inputs, video_query_ids=inputs["video_query_ids"].flip(-1))
        cached = model(**dict(follow, pixel_values_videos=inputs["pixel_values_videos"][:0]),
                       video_feature_slots=hits).logits
        plain = model(**follow).logits
        again = model(**inputs).logits
    assert torch.equal(cached, plain)
    assert torch.equal(first, again)


@pytest.mark.parametrize("reentrant", [None, True, False])
def test_stage_3_pruner_gradient_with_the_triton_kernel(tiny, reentrant):
    """Stage 3 on the GPU: the pruner's gradient from the attention values (value_gates.py) through the Triton
    kernel equals the PyTorch reference's, with gradient checkpointing (reentrant or not) or without."""
    from transformers import AutoTokenizer

    from swift_sophia.model.modeling_sophia import SophiaForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    grads = {}
    for backend in ("reference", "triton"):
        model = SophiaForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32, prune_alpha=50.0,
                                                               prune_beta=0.0, gumbel_anneal_rate=0.0).cuda().train()
        model.config.attention_backend = backend
        with torch.no_grad():
            model.model.pruner.query_mlp[2].weight.normal_(0, 0.1, generator=torch.Generator("cuda").manual_seed(0))
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("model.pruner."))
        if reentrant is not None and backend == "triton":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        inputs = _inputs(tokenizer, model, frames=(16, 9))
        frames = inputs["video_frame_counts"].tolist()
        inputs["video_frame_shots"] = torch.cat([torch.arange(f) * 4 // f for f in frames]).cuda()
        query = torch.tensor([tokenizer.encode("Which shot shows the dog?")] * len(frames)).cuda()
        inputs.update(video_query_ids=query, video_query_mask=torch.ones_like(query))
        labels = inputs["input_ids"].clone()
        labels[:, :-4] = -100
        torch.manual_seed(1)
        model(**inputs, labels=labels).loss.backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.model.pruner.query_mlp.parameters()])
    ref, tri = grads["reference"], grads["triton"]
    assert ref.abs().sum() > 0 and torch.isfinite(tri).all()
    assert (tri - ref).norm() / ref.norm() < 1e-3  # float32 kernel against float32 reference, as above
