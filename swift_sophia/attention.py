"""Hierarchical attention inside any transformers decoder.

transformers dispatches attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` and passes the
decoder's `**kwargs` through to it. Sophia installs "sophia_<base>" on the decoder (e.g. "sophia_sdpa"): when the call
carries a `hier_layout` (a prefill or training step over an extended sequence holding videos) it runs the
hierarchical kernel; otherwise (text, images, decoding after prefill) it hands over to the implementation the user
chose (sdpa, eager, flash_attention_2, ...), masks included.
"""
from __future__ import annotations

import contextlib
import contextvars

from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from sophia_kernels import hierarchical_attention

PREFIX = "sophia_"
_hierarchical_step = contextvars.ContextVar("sophia_hierarchical_step", default=False)


def _make_attention(base: str):
    def sophia_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                 hier_layout=None, sophia_attention_backend="auto", **kwargs):
        if hier_layout is None:
            fn = ALL_ATTENTION_FUNCTIONS[base] if base != "eager" else eager_attention_forward
            return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if dropout and module.training:
            raise ValueError("hierarchical attention has no attention dropout; set attention_dropout=0")
        out = hierarchical_attention(query, key, value, hier_layout, scale=scaling,
                                     implementation=sophia_attention_backend)
        return out.transpose(1, 2).contiguous(), None

    return sophia_attention_forward


def _make_mask(base: str):
    def sophia_attention_mask(*args, **kwargs):
        # Over an extended sequence the mask is a rule the kernel applies: never build an N x N tensor for it.
        if _hierarchical_step.get():
            return None
        fn = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(base)
        return fn(*args, **kwargs) if fn is not None else kwargs.get("attention_mask")

    return sophia_attention_mask


def install(text_config) -> str:
    """Route the decoder's attention through Sophia, on top of the implementation the user chose.

    The decoder's implementation becomes "sophia_<base>" (e.g. "sophia_sdpa"): hierarchical attention for
    extended sequences, <base> for everything else.
    """
    current = text_config._attn_implementation or "sdpa"
    if current.startswith(PREFIX):
        return current
    name = PREFIX + current
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(name, _make_attention(current))
        AttentionMaskInterface.register(name, _make_mask(current))
    text_config._attn_implementation_internal = name
    return name


@contextlib.contextmanager
def hierarchical_step():
    token = _hierarchical_step.set(True)
    try:
        yield
    finally:
        _hierarchical_step.reset(token)


__all__ = ["install", "hierarchical_step"]
