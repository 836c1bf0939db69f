"""The frame budget of a request: how many frames of each video may reach the decoder (config `prune_max_frames`).

A number is the budget of every video. `"auto"` asks the GPU: the memory the allocator can still hand out, less a
margin, over what one kept frame costs in the prefill at this model's shape (its keys and values in every layer's
KV cache, plus the decoder's working set over the frame's share of the extended sequence), shared among the
request's videos by their frame counts. A long video then gets fewer frames instead of an out-of-memory error.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

# [tokens x hidden] tensors one decoder layer holds at its peak over the extended sequence, beside the KV cache:
# the decoder's own forward about 4.5 at the 8B shape (docs/benchmarks.md); the lean prefill the residual, q, k and v
# (2.5 at the 8B shape) and one chunk's intermediates; both rounded up.
WORKING_SET_TENSORS = 5.0
LEAN_WORKING_SET_TENSORS = 3.0
MARGIN_BYTES = 2 << 30  # left free for the vision tower's chunks, the LM head, allocator rounding


def bytes_per_kept_frame(config, dtype: torch.dtype = torch.bfloat16) -> float:
    """Prefill memory one kept level-0 frame costs: its KV cache rows in every layer and the decoder's working set
    over its share of the extended sequence (its aggregated levels included)."""
    text = config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    element = torch.finfo(dtype).bits // 8
    tokens = config.tokens_per_frame
    levels = config.hier_levels if config.use_hierarchy else 1
    extended = 1.0 + sum(config.hier_arity ** -level for level in range(1, levels))
    kv_element = element if getattr(config, "kv_cache_bits", 16) == 16 else 1 + element / head_dim  # int8 + scale
    kv_cache = tokens * text.num_hidden_layers * 2 * kv_heads * head_dim * kv_element
    tensors = LEAN_WORKING_SET_TENSORS if getattr(config, "lean_prefill", False) else WORKING_SET_TENSORS
    working = tensors * extended * tokens * text.hidden_size * element
    return kv_cache + working


def free_device_bytes(device: torch.device) -> int:
    """What the CUDA allocator can still hand out on `device`: free device memory plus its own cached blocks."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def frame_budgets(config, frame_counts: Sequence[int], device: torch.device,
                  dtype: torch.dtype = torch.bfloat16) -> List[Optional[int]]:
    """The budget of each video of a request (None: no budget)."""
    budget = getattr(config, "prune_max_frames", 0)
    if not budget:
        return [None] * len(frame_counts)
    if budget != "auto":
        return [int(budget)] * len(frame_counts)
    if device.type != "cuda":  # documented: no memory estimate without a GPU
        return [None] * len(frame_counts)
    total = max(1, int((free_device_bytes(device) - MARGIN_BYTES) // bytes_per_kept_frame(config, dtype)))
    frames = max(1, sum(frame_counts))
    return [max(1, total * count // frames) for count in frame_counts]


__all__ = ["frame_budgets", "bytes_per_kept_frame", "free_device_bytes", "WORKING_SET_TENSORS"]
