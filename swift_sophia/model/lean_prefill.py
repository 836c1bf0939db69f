"""A lean prefill: the decoder over an extended sequence at inference, holding little more than the residual stream
and the KV cache.

transformers' decoder layer keeps several [tokens x hidden] tensors alive at once (the residual, the normed input,
q, the rotated q and k, the attention output, the output projection, the sum), about 4.5 of them at the 8B shape
(docs/benchmarks.md); at an hour of video, where the extended sequence has a million tokens, each is 8 GiB. Without
autograd nothing needs them, so each layer here runs as:

1. q, k and v from the normed residual, a chunk of tokens at a time, into one preallocated q, k and v (the normed
   input never exists whole), then rotated a chunk at a time;
2. the KV cache takes its rows of k and v (text and level-0 tokens, `kv_cache.PrefillCache`);
3. hierarchical attention writes its output over q;
4. the residual is updated in place: `+= o_proj(attention)` and `+= mlp(norm(residual))`, a chunk at a time.

So one layer holds the residual, q (then the attention output) and k and v (a quarter of q each at the 8B shape, 8
of 32 heads), and one chunk's intermediates; aggregated tokens' keys and values are gone with their layer. The
arithmetic is the decoder's own, row by row (its modules, its rotary function), so the result is the same
(tested against the decoder's forward). Used for decoders whose layers have the Llama layout
(`LLAMA_LAYOUT_LAYERS`: Llama, InternLM2 converted to it, Qwen2, Mistral); anything else runs through the decoder's
own forward.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from sophia_kernels import hierarchical_attention

_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_NOT_HANDLED = ("q_norm", "k_norm")  # per-head norms (Qwen3, OLMo2): the decoder's own forward
# Decoder layers whose forward is exactly norm -> attention -> residual -> norm -> MLP -> residual, and whose model
# adds nothing between the embeddings and the first layer (Gemma scales them, Gemma 2 has four norms a layer).
LLAMA_LAYOUT_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "MistralDecoderLayer")


def supports_lean_prefill(decoder: nn.Module) -> bool:
    layers = getattr(decoder, "layers", None)
    if not layers or getattr(decoder, "rotary_emb", None) is None or getattr(decoder, "norm", None) is None:
        return False
    for layer in layers:
        if type(layer).__name__ not in LLAMA_LAYOUT_LAYERS:
            return False
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in _ATTENTION_PARTS) \
                or any(hasattr(attn, p) for p in _NOT_HANDLED) or _rotary_function(attn) is None:
            return False
        if not all(hasattr(layer, p) for p in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return False
    return True


def _rotary_function(attn: nn.Module):
    """The decoder's module-level `apply_rotary_pos_emb` (looked up at call time: Liger or chunking may wrap it)."""
    return getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)


def _chunks(tokens: int, chunk: int):
    step = chunk if chunk > 0 else tokens
    return [(s, min(tokens, s + step)) for s in range(0, tokens, step)]


@torch.no_grad()
def lean_prefill(decoder: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, layout, cache=None, *,
                 chunk: int = 16384, backend: str = "auto") -> torch.Tensor:
    """Run `decoder` (its layers and final norm) over the extended sequence `hidden` [B, N, D], which is updated in
    place and returned as the final hidden states; `cache` (a `PrefillCache` or None) is filled layer by layer."""
    batch, tokens, _ = hidden.shape
    spans = _chunks(tokens, chunk)
    cos, sin = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer_idx, layer in enumerate(decoder.layers):
        _lean_layer(layer, layer_idx, hidden, cos, sin, layout, cache, spans, backend)
    del cos, sin
    for s, e in spans:
        hidden[:, s:e] = decoder.norm(hidden[:, s:e])
    return hidden


def _lean_layer(layer, layer_idx, hidden, cos, sin, layout, cache, spans, backend) -> None:
    attn = layer.self_attn
    batch, tokens, _ = hidden.shape
    config = attn.config
    head_dim = attn.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    q = hidden.new_empty(batch, tokens, heads * head_dim)
    k = hidden.new_empty(batch, tokens, kv_heads * head_dim)
    v = hidden.new_empty(batch, tokens, kv_heads * head_dim)
    for s, e in spans:
        x = layer.input_layernorm(hidden[:, s:e])
        q[:, s:e], k[:, s:e], v[:, s:e] = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    del x
    q_heads = q.view(batch, tokens, heads, head_dim).transpose(1, 2)  # [B, Hq, N, hd], q's memory
    k_heads = k.view(batch, tokens, kv_heads, head_dim).transpose(1, 2)
    v_heads = v.view(batch, tokens, kv_heads, head_dim).transpose(1, 2)
    rotate = _rotary_function(attn)
    for s, e in spans:
        q_rot, k_rot = rotate(q_heads[:, :, s:e], k_heads[:, :, s:e], cos[:, s:e], sin[:, s:e])
        if q_rot.data_ptr() != q_heads[:, :, s:e].data_ptr():  # Liger rotates in place, the decoder's own does not
            q_heads[:, :, s:e] = q_rot
        if k_rot.data_ptr() != k_heads[:, :, s:e].data_ptr():
            k_heads[:, :, s:e] = k_rot
    del q_rot, k_rot
    if cache is not None:
        cache.update(k_heads, v_heads, layer_idx)
    hierarchical_attention(q_heads, k_heads, v_heads, layout, scale=attn.scaling, implementation=backend,
                           out=q_heads)  # every query tile is read before its output is written
    del k, v, k_heads, v_heads
    for s, e in spans:  # q now holds the attention output, [B, N, Hq * hd]
        hidden[:, s:e] += attn.o_proj(q[:, s:e])
    del q, q_heads
    for s, e in spans:
        hidden[:, s:e] += layer.mlp(layer.post_attention_layernorm(hidden[:, s:e]))


__all__ = ["lean_prefill", "supports_lean_prefill"]
