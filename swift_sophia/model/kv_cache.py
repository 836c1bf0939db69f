"""The KV cache of a prefill over an extended sequence: only what decoding reads ever enters it.

After the prefill no text token reads an aggregated frame (level >= 1) and pruned frames are not in the sequence
at all, so decoding needs the keys and values of text and level-0 tokens only. `PrefillCache` stores exactly
those while the prefill runs, layer by layer (each layer's attention still gets the whole extended sequence), so
the cache is the size of a plain VLM's over the kept frames and nothing is copied afterwards. Rows are
right-aligned (left padding), as decoding with an attention mask expects.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from transformers.cache_utils import DynamicCache


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


class PrefillCache(DynamicCache):
    """A `DynamicCache` whose first update of every layer (the prefill) keeps only the positions in `index`.

    Later updates (decoding steps) append as usual.
    """

    def __init__(self, index: torch.Tensor, config=None):
        super().__init__(config=config)
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


__all__ = ["PrefillCache", "cache_index"]
