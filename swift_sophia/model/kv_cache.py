"""The KV cache of a prefill over an extended sequence: only what decoding reads ever enters it.

After the prefill no text token reads an aggregated frame (level >= 1) and pruned frames are not in the sequence
at all, so decoding needs the keys and values of text and level-0 tokens only. `PrefillCache` stores exactly
those while the prefill runs, layer by layer (each layer's attention still gets the whole extended sequence), so
the cache is the size of a plain VLM's over the kept frames and nothing is copied afterwards. Rows are
right-aligned (left padding), as decoding with an attention mask expects.

`kv_cache_bits=8` stores the cache in int8 (`Int8KVLayer`, transformers' `QuantizedLayer` with a quantizer of its
own): every token's key and value vector of every head is scaled by its own absolute maximum (symmetric, one scale
per head and token), which halves the cache (32 -> 16.1 MiB per kept frame at the 8B shape). The latest tokens stay
in full precision until `residual_length` of them are gathered, as in transformers' quantized caches; each decoding
step reads the whole cache dequantized, one layer at a time.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, QuantizedLayer


def cache_index(keep: List[torch.Tensor], device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row the extended positions to keep -> (gather index [B, K], attention mask [B, K]), right-aligned;
    the padding slots of shorter rows point at position 0 and are masked out."""
    longest = max((int(k.numel()) for k in keep), default=0)
    index = torch.zeros(len(keep), longest, dtype=torch.long, device=device)
    mask = torch.zeros(len(keep), longest, dtype=torch.long, device=device)
    for b, k in enumerate(keep):
        n = int(k.numel())
        if n:
            index[b, longest - n:] = k.to(device)
            mask[b, longest - n:] = 1
    return index, mask


def quantize_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """[..., D] -> (int8 [..., D], scale [..., 1] in x's dtype): x ~ q * scale, |error| <= scale / 2 per element."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / 127.0
    q = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(x.dtype)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(scale.dtype) * scale


class Int8KVLayer(QuantizedLayer):
    """A cache layer holding keys and values in int8 with one scale per head and token (`quantize_int8`)."""

    def __init__(self, residual_length: int = 128):
        super().__init__(nbits=8, residual_length=residual_length)

    def _quantize(self, tensor: torch.Tensor, axis: int):
        return quantize_int8(tensor)

    def _dequantize(self, q_tensor):
        return dequantize_int8(*q_tensor)


class PrefillCache(DynamicCache):
    """A `DynamicCache` whose first update of every layer (the prefill) keeps only the positions in `index`.

    Later updates (decoding steps) append as usual. `kv_bits=8`: full-attention layers stored in int8.
    """

    def __init__(self, index: torch.Tensor, config=None, kv_bits: int = 16):
        super().__init__(config=config)
        if kv_bits not in (8, 16):
            raise ValueError(f"kv_cache_bits must be 16 or 8, got {kv_bits}")
        if kv_bits == 8:
            if not self.layers:
                raise ValueError("an 8-bit KV cache needs the decoder's config (its layers)")
            self.layers = [Int8KVLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        self._prefill_index: Optional[torch.Tensor] = index  # [B, K]
        self._prefilled: set = set()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self._prefill_index is None or layer_idx in self._prefilled:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._prefilled.add(layer_idx)
        index = self._prefill_index[:, None, :, None]
        kept_k = torch.gather(key_states, 2, index.expand(-1, key_states.shape[1], -1, key_states.shape[-1]))
        kept_v = torch.gather(value_states, 2, index.expand(-1, value_states.shape[1], -1, value_states.shape[-1]))
        super().update(kept_k, kept_v, layer_idx, *args, **kwargs)
        return key_states, value_states  # this layer's attention runs over the whole extended sequence

    def end_prefill(self) -> None:
        self._prefill_index = None


__all__ = ["PrefillCache", "cache_index", "Int8KVLayer", "quantize_int8", "dequantize_int8"]
