"""Sequence parallelism (ms-swift's `--sequence_parallel_size`, Ulysses) over Sophia's extended sequence: the torch
half, which knows nothing of ms-swift (its half, which hooks this one into ms-swift's `SequenceParallel`, is
`swift_sophia/ms_swift/sequence_parallel.py`).

ms-swift (`swift.sequence_parallel.SequenceParallel.prepare`) pads and splits the inputs of the language model
(`get_llm_model`: here the decoder, `model.language_model`) in a forward pre-hook, so each rank runs the decoder
on N / P tokens, and wraps only `ALL_ATTENTION_FUNCTIONS["sdpa"]` / `["flash_attention_2"]` in its all-to-all.
SophiaModel calls the decoder with the extended sequence it builds from the full plain sequence, so that hook
already splits the extended sequence; what Sophia adds here:

* the hierarchical kernel under the same all-to-all: sequence-sharded q, k, v [B, H, N/P, D] -> head-sharded
  [B, H/P, N, D], the kernel over the full layout on this rank's heads, back to [B, H, N/P, D]
  (`sharded_hierarchical_attention`, called by the attention router for the group `active_group` names);
* the decoder's output gathered back to the full extended sequence (the plain sequence is a gather from it), and
  the plain hidden states split again the way ms-swift splits the labels (`hook_model`);
* the loss from the label positions only: the model returns the cross-entropy per position (`token_loss`) for the
  rank's labels, given as `shift_labels` (the ms-swift half gathers it over the group).

Every rank builds the same extended sequence (vision tower, pruning, aggregation run on the full batch on every
rank of a group); the decoder, where the tokens x hidden activations are, runs on 1/P of the tokens.
"""
from __future__ import annotations

import zlib
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.nn import functional as F

_group_source: Optional[Callable[[], object]] = None


def _all_to_all(x: torch.Tensor, group, to_heads: bool) -> torch.Tensor:
    p = dist.get_world_size(group)
    b, h, n, d = x.shape
    if to_heads:  # [B, H, n, D] (this rank's tokens) -> [B, H/P, P*n, D] (this rank's heads, all tokens)
        if h % p:
            raise ValueError(f"sequence parallel over {p} ranks needs a head count divisible by {p}, got {h}")
        send = x.reshape(b, p, h // p, n, d).transpose(0, 1).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's tokens of this rank's heads
        return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * n, d)
    send = x.reshape(b, h, p, n // p, d).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's heads of this rank's tokens
    return recv.transpose(0, 1).reshape(b, p * h, n // p, d)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.group, ctx.to_heads = group, to_heads
        return _all_to_all(x, group, to_heads)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.group, not ctx.to_heads), None, None


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 1. Backward sums the ranks' gradients before taking this rank's slice: after the
    gather every rank reads tokens of every other rank (the plain sequence is a gather from the extended one)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.size = group, dist.get_rank(group), x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size].contiguous(), None


def sharded_hierarchical_attention(query, key, value, layout, group, *, in_place=False, value_gate=None,
                                   **kernel_kwargs):
    """`hierarchical_attention` on sequence shards: q [B, Hq, N/P, D], k, v [B, Hkv, N/P, D] (rank r holds tokens
    [r N/P, (r+1) N/P) of the rows `layout` describes; tokens past the layout are padding); Hq and Hkv divisible
    by P. Returns [B, Hq, N/P, D], equal to the same tokens of the unsharded kernel's output."""
    from sophia_kernels import hierarchical_attention

    q, k, v = (_AllToAll.apply(x, group, True) for x in (query, key, value))
    if value_gate is not None:  # this rank's heads over the whole sequence (value_gates.py)
        v = value_gate.watch(v)
    out = hierarchical_attention(q, k, v, layout, out=q if in_place else None, **kernel_kwargs)
    return _AllToAll.apply(out, group, False)


def set_group_source(source: Optional[Callable[[], object]]) -> None:
    """Where `active_group` finds the sequence-parallel process group: a function that returns it, or None while
    sequence parallelism is off (ms-swift's, set by swift_sophia.ms_swift.sequence_parallel); None: never on."""
    global _group_source
    _group_source = source


def active_group():
    """The sequence-parallel process group of the step in flight, else None."""
    return _group_source() if _group_source is not None else None


def _layout_fingerprint(layout, length: int, device) -> torch.Tensor:
    data = repr((length, layout.seqs.tolist(), layout.videos.tolist(), layout.tokens_per_frame, layout.arity,
                 layout.levels, layout.neighbours)).encode()
    return torch.tensor([length, zlib.crc32(data)], dtype=torch.long, device=device)


def _decoder_hooks(decoder, group):
    lengths = []  # the extended length of the call in flight (a stack: one entry per hierarchical call)

    def before_split(module, args, kwargs):  # runs before ms-swift's split (prepended)
        layout = kwargs.get("hier_layout")
        if layout is None:
            return
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            raise ValueError("sequence parallel hierarchical attention needs inputs_embeds")
        if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
            raise NotImplementedError("a prefill with a KV cache does not run under sequence parallelism")
        # Every rank must hold the same extended sequence (same kept frames): the all-to-all pairs their tokens.
        mine = _layout_fingerprint(layout, embeds.shape[1], embeds.device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        if any(not torch.equal(mine, other) for other in every):
            raise RuntimeError("the ranks of a sequence-parallel group built different extended sequences (lengths "
                               f"{[int(t[0]) for t in every]}): they must see the same batch and keep the same "
                               "frames (pruning in training must draw the same Gumbel noise on every rank)")
        lengths.append(embeds.shape[1])

    def after_split(module, args, kwargs):  # after ms-swift's split: the layout is the mask, no N x N mask
        if kwargs.get("hier_layout") is not None:
            kwargs["attention_mask"] = None
            return args, kwargs

    def gather(module, args, kwargs, output):
        if kwargs.get("hier_layout") is None:
            return output
        length = lengths.pop()
        output.last_hidden_state = _GatherSequence.apply(output.last_hidden_state, group)[:, :length]
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(_GatherSequence.apply(h, group)[:, :length] for h in output.hidden_states)
        return output

    return [decoder.register_forward_pre_hook(before_split, with_kwargs=True, prepend=True),
            decoder.register_forward_pre_hook(after_split, with_kwargs=True),
            decoder.register_forward_hook(gather, with_kwargs=True)]


def split_plain(hidden: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice of [B, N, ...] the way ms-swift splits labels: padded to a multiple of P, P chunks."""
    p, rank = dist.get_world_size(group), dist.get_rank(group)
    pad = -hidden.shape[1] % p
    if pad:
        hidden = F.pad(hidden, (0, 0) * (hidden.dim() - 2) + (0, pad))
    return hidden.chunk(p, dim=1)[rank].contiguous()


def _model_hooks(sophia_model, group):
    def check(module, args, kwargs):
        if kwargs.get("pixel_values_videos") is not None and not module.config.use_hierarchy:
            raise NotImplementedError("use_hierarchy=False (the ablation) does not run under sequence parallelism")

    def split(module, args, kwargs, output):
        if kwargs.get("pixel_values_videos") is None:
            return output  # the decoder ran on ms-swift's split of the plain sequence: already this rank's slice
        output.last_hidden_state = split_plain(output.last_hidden_state, group)
        if output.hidden_states is not None:
            output.hidden_states = tuple(split_plain(h, group) for h in output.hidden_states)
        return output

    return [sophia_model.register_forward_pre_hook(check, with_kwargs=True),
            sophia_model.register_forward_hook(split, with_kwargs=True)]


def hook_model(sophia_model, group) -> list:
    """Hook one SophiaModel (and its decoder) for sequence parallelism over `group`; returns the hook handles."""
    return _decoder_hooks(sophia_model.language_model, group) + _model_hooks(sophia_model, group)


__all__ = ["sharded_hierarchical_attention", "set_group_source", "active_group", "split_plain", "hook_model"]
