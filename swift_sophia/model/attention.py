"""Hierarchical attention inside any transformers decoder.

transformers dispatches attention through `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` and passes the
decoder's `**kwargs` through to it. Sophia puts a router in front of the implementation the decoder uses (sdpa,
eager, flash_attention_2, ...) under the same name, so the user's choice and everything transformers derives from
the name (output_attentions with eager, flash-attention packing) stay as they are. The router hands every call
to that implementation unchanged, except a call that carries a `hier_layout` (only Sophia's prefill or training
step over an extended sequence passes one): that runs the hierarchical kernel. Inside that step the mask
function returns None: over an extended sequence the mask is a rule the kernel applies, never an N x N tensor.
`install` is idempotent and the model calls it again before every step over videos, so a later
`set_attn_implementation` (or another library replacing the registered function) cannot remove the hierarchy.
Under ms-swift's sequence parallelism the decoder holds a shard of the extended sequence: the hierarchical branch
then runs the kernel on this rank's heads over the whole sequence (`sequence_parallel.py`), in front of the
all-to-all ms-swift puts around sdpa / flash_attention_2, which only the other calls go through.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.llama import modeling_llama

from sophia_kernels import hierarchical_attention

from . import sequence_parallel

_LEGACY_PREFIX = "sophia_"  # implementations were renamed "sophia_<base>" before the router kept the name
_hierarchical_step = contextvars.ContextVar("sophia_hierarchical_step", default=False)


def _module_eager(module):
    """The eager attention function of the decoder's own modeling file (Llama's if it has none)."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return own if own is not None else modeling_llama.eager_attention_forward


def _attention_router(original):
    def sophia_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                 hier_layout=None, sophia_attention_backend="auto", sophia_value_gate=None, **kwargs):
        if hier_layout is None:
            fn = original if original is not None else _module_eager(module)
            return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        if dropout and module.training:
            raise ValueError("hierarchical attention has no attention dropout; set attention_dropout=0")
        # Without autograd the output overwrites the query, which the decoder does not read again: one
        # [tokens x hidden] tensor less at the peak of every layer.
        in_place = not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
        group = sequence_parallel.active_group()  # ms-swift's --sequence_parallel_size: q, k, v are sequence shards
        if group is not None:
            out = sequence_parallel.sharded_hierarchical_attention(
                query, key, value, hier_layout, group, in_place=in_place, value_gate=sophia_value_gate,
                scale=scaling, implementation=sophia_attention_backend)
        else:
            if sophia_value_gate is not None:  # stage 3 (value_gates.py)
                value = sophia_value_gate.watch(value)
            out = hierarchical_attention(query, key, value, hier_layout, scale=scaling,
                                         implementation=sophia_attention_backend, out=query if in_place else None)
        return out.transpose(1, 2).contiguous(), None  # the kernel never materialises attention weights

    sophia_attention_forward.sophia_router = True
    return sophia_attention_forward


def _mask_router(original):
    def sophia_attention_mask(*args, **kwargs):
        if _hierarchical_step.get():
            return None
        return original(*args, **kwargs) if original is not None else kwargs.get("attention_mask")

    sophia_attention_mask.sophia_router = True
    return sophia_attention_mask


def install(text_config) -> str:
    """Put Sophia's router in front of the decoder's attention implementation; returns its name."""
    name = text_config._attn_implementation or "sdpa"
    if name.startswith(_LEGACY_PREFIX):
        name = name[len(_LEGACY_PREFIX):]
    if text_config._attn_implementation != name:
        text_config._attn_implementation_internal = name
    current = _attention_function(name)
    if not getattr(current, "sophia_router", False):
        if name in ALL_ATTENTION_FUNCTIONS._local_mapping:
            # Set on the shared instance, which decoders read first (ms-swift's sequence parallelism puts its
            # all-to-all there): the router goes in front of it, so hierarchical calls never pass through it.
            ALL_ATTENTION_FUNCTIONS[name] = _attention_router(current)
        else:
            AttentionInterface.register(name, _attention_router(current))
    mask = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(name)
    if not getattr(mask, "sophia_router", False):
        AttentionMaskInterface.register(name, _mask_router(mask))
    return name


def _attention_function(name):
    """What a decoder calls for `name`: the shared instance's own entry first, then the class-wide one."""
    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    return local[name] if name in local else ALL_ATTENTION_FUNCTIONS._global_mapping.get(name)


def is_installed(text_config) -> bool:
    name = text_config._attn_implementation or "sdpa"
    return getattr(_attention_function(name), "sophia_router", False)


@contextlib.contextmanager
def hierarchical_step():
    token = _hierarchical_step.set(True)
    try:
        yield
    finally:
        _hierarchical_step.reset(token)


__all__ = ["install", "is_installed", "hierarchical_step"]
