"""Bounded activation memory for long inputs: position-wise work done a chunk of tokens (or frames) at a time.

A decoder's MLP and norms act on every token independently, so running them over the sequence in chunks gives
the same result while only one chunk's intermediate tensors exist at a time: at 100K+ tokens an MLP of width
14,336 would otherwise materialise several [tokens x 14336] tensors, and an RMSNorm a float32 copy of the hidden
states. The modules stay where they are (checkpoint keys, LoRA targets and `--target_modules all-linear` see
the same names); only their `forward` runs chunk by chunk. When gradients are needed each chunk runs under
activation checkpointing, so that backward, too, holds one chunk's intermediates at a time.

DeepSpeed ZeRO-3 gathers a module's weights at every call and every rank must make the same calls, so under
ZeRO-3 chunking is off (one call per module, as without it).
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled


def run_in_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int, dim: int) -> torch.Tensor:
    """`fn(x)` for a function that treats every index of `x` along `dim` independently, `chunk` indices at a time.

    Without gradients the outputs are written into one preallocated tensor; with gradients every chunk is
    checkpointed (its intermediates are recomputed in backward instead of kept).
    """
    size = x.shape[dim]
    if chunk <= 0 or size <= chunk or is_deepspeed_zero3_enabled():
        return fn(x)
    grad = torch.is_grad_enabled() and (x.requires_grad or _has_trainable_params(fn))
    if grad:
        parts = [checkpoint(fn, x.narrow(dim, s, min(chunk, size - s)), use_reentrant=False)
                 for s in range(0, size, chunk)]
        return torch.cat(parts, dim=dim)
    first = fn(x.narrow(dim, 0, chunk))
    shape = list(first.shape)
    shape[dim] = size
    out = first.new_empty(shape)
    out.narrow(dim, 0, chunk).copy_(first)
    del first
    for s in range(chunk, size, chunk):
        n = min(chunk, size - s)
        out.narrow(dim, s, n).copy_(fn(x.narrow(dim, s, n)))
    return out


def _has_trainable_params(fn) -> bool:
    module = getattr(fn, "__self__", None)
    return isinstance(module, nn.Module) and any(p.requires_grad for p in module.parameters())


class _ChunkedForward:
    """Replaces a position-wise module's forward: the original forward over chunks of the sequence (dim 1)."""

    def __init__(self, module: nn.Module, config):
        self.forward = module.forward  # the class's forward, bound to the module
        self.config = config

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        chunk = int(getattr(self.config, "decoder_chunk_tokens", 0) or 0)
        if args or kwargs or hidden_states.dim() != 3:
            return self.forward(hidden_states, *args, **kwargs)
        return run_in_chunks(self.forward, hidden_states, chunk, dim=1)


def chunk_positionwise_layers(language_model: nn.Module, config) -> int:
    """Make the MLP and the norms of every decoder layer (and the final norm) run over the sequence in chunks of
    `config.decoder_chunk_tokens` tokens (read at every call, so it can change after loading). Returns the number
    of modules changed."""
    changed = 0
    targets = []
    for layer in getattr(language_model, "layers", []):
        targets += [module for name, module in layer.named_children() if name == "mlp" or _is_norm(module)]
    norm = getattr(language_model, "norm", None)
    if norm is not None:
        targets.append(norm)
    targets = [m for m in targets if not (_is_norm(m) and is_liger(m.forward))]  # one pass, nothing to bound
    for module in targets:
        if not isinstance(module.__dict__.get("forward"), _ChunkedForward):
            module.forward = _ChunkedForward(module, config)
            changed += 1
    return changed


def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def is_liger(fn) -> bool:
    """Whether a (bound) forward or a function comes from Liger-Kernel (swift_sophia.model.liger)."""
    fn = getattr(fn, "__func__", fn)
    return getattr(fn, "__module__", "").startswith("liger_kernel")


# Rotary embeddings: `(q * cos) + (rotate_half(q) * sin)` makes three temporaries the size of q. For long sequences
# the decoder's own `apply_rotary_pos_emb` runs over chunks of the sequence into one output tensor instead (the same
# elementwise arithmetic, so the same bits, for any model that calls it). The chunk size is process-wide, not
# per call, because activation checkpointing recomputes the layer outside any context the forward ran in.
_rotary_chunk_tokens = 0


def chunk_rotary_embedding(language_model: nn.Module, tokens: int) -> bool:
    """Wrap the module-level `apply_rotary_pos_emb` of the decoder's modeling file (it is looked up at call time)
    so that sequences longer than `tokens` are rotated `tokens` at a time (0: never). Returns whether the decoder
    has such a function."""
    global _rotary_chunk_tokens
    _rotary_chunk_tokens = int(tokens or 0)
    layers = getattr(language_model, "layers", None)
    attn = getattr(layers[0], "self_attn", None) if layers else None
    module = sys.modules.get(type(attn).__module__) if attn is not None else None
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None:
        return False
    if not getattr(original, "sophia_chunked", False) and not is_liger(original):  # Liger's rotates in place
        module.apply_rotary_pos_emb = _chunked_rotary(original)
    return True


def _chunked_rotary(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        chunk, n = _rotary_chunk_tokens, q.shape[-2]
        if chunk <= 0 or n <= chunk or args or kwargs or q.dim() != 4 or cos.dim() != 3 or k.shape[-2] != n:
            return original(q, k, cos, sin, *args, **kwargs)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            q_part, k_part = original(q[:, :, s:e], k[:, :, s:e], cos[:, s:e], sin[:, s:e])
            q_out[:, :, s:e] = q_part
            k_out[:, :, s:e] = k_part
        return q_out, k_out

    apply_rotary_pos_emb.sophia_chunked = True
    return apply_rotary_pos_emb


__all__ = ["run_in_chunks", "chunk_positionwise_layers", "chunk_rotary_embedding", "is_liger"]
