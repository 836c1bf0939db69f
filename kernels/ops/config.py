"""Launch configuration of the hierarchical-attention kernels, and its fit to the device's shared memory.

Shared memory of a kernel (Triton on sm_90 keeps the resident tiles and ``num_stages`` copies of the streamed
tiles; offline compiles with Triton 3.9 for sm_90 match this model to the byte for bf16 and fp16, and it is an
upper bound for fp32 and for sm_80, where the pipeliner keeps one copy fewer):

* forward: Q resident (BLOCK_M x D), K and V streamed (2 x BLOCK_N x D per stage);
* dQ: Q and dO resident, K and V streamed;
* dK/dV: K and V resident (BLOCK_N keys), Q and dO streamed (2 x BLOCK_M x D per stage) with LSE and delta
  (2 x BLOCK_M float32 per stage).

``choose_config`` starts from the tuned default (H100, bf16, D = 128: NOTES.md) and shrinks a kernel's pipeline
stages, then its streamed block, then its resident block, until the estimate fits the device's
``max_shared_mem``; if Triton still reports a kernel out of resources, the wrappers shrink that kernel one step more
and retry (``shrink``), remembering the result for the device.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["HierAttnConfig", "KERNELS", "choose_config", "fit_shared_memory", "max_shared_memory",
           "remember_config", "shared_memory_bytes", "shrink"]

KERNELS = ("fwd", "dq", "dkdv")


@dataclass(frozen=True)
class HierAttnConfig:
    """Block sizes and launch parameters (defaults tuned for H100, D = 128, bf16; NOTES.md)."""

    fwd_block_m: int = 128  # queries per tile
    fwd_block_n: int = 64  # keys per loop step
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_block_m: int = 128
    dq_block_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 3
    # v4: 64 keys x 64 queries, 4 warps, 2 stages: 99 KB of shared memory, so two CTAs share an SM and one's
    # exponentials overlap the other's matmuls (v3: 128 x 64, 8 warps, 3 stages, 165 KB, one CTA; NOTES.md)
    dkdv_block_n: int = 64  # keys per tile
    dkdv_block_m: int = 64  # queries per loop step
    dkdv_warps: int = 4
    dkdv_stages: int = 2
    dkdv_split_chunk: int = 0  # 0: automatic; -1: never split heavy key tiles; > 0: split size in tokens

    @staticmethod
    def for_interpreter() -> "HierAttnConfig":
        return HierAttnConfig(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1)

    def blocks(self, kernel: str) -> tuple[int, int, int, int]:
        """(resident block, streamed block, warps, stages) of ``kernel`` ("fwd", "dq" or "dkdv")."""
        if kernel == "dkdv":
            return self.dkdv_block_n, self.dkdv_block_m, self.dkdv_warps, self.dkdv_stages
        return (getattr(self, f"{kernel}_block_m"), getattr(self, f"{kernel}_block_n"),
                getattr(self, f"{kernel}_warps"), getattr(self, f"{kernel}_stages"))

    def with_blocks(self, kernel: str, resident: int, streamed: int, warps: int, stages: int) -> "HierAttnConfig":
        if kernel == "dkdv":
            kw = {"dkdv_block_n": resident, "dkdv_block_m": streamed}
        else:
            kw = {f"{kernel}_block_m": resident, f"{kernel}_block_n": streamed}
        return dataclasses.replace(self, **kw, **{f"{kernel}_warps": warps, f"{kernel}_stages": stages})


def shared_memory_bytes(cfg: HierAttnConfig, kernel: str, head_dim: int, elem_size: int) -> int:
    """Estimated shared memory of one CTA of ``kernel`` (see the module docstring)."""
    res, stream, _, stages = cfg.blocks(kernel)
    resident_tiles = 1 if kernel == "fwd" else 2  # Q | Q, dO | K, V
    total = elem_size * head_dim * (resident_tiles * res + stages * 2 * stream)
    if kernel == "dkdv":
        total += stages * 2 * stream * 4  # LSE and delta of the streamed queries
    return total


def shrink(cfg: HierAttnConfig, kernel: str) -> HierAttnConfig | None:
    """``cfg`` with ``kernel`` one step smaller, or None at the smallest (16 x 16 blocks, one stage). Order: stages
    down to 2, streamed block down to 32, resident block down to 64 (4 warps), one stage, then blocks down to 16."""
    res, stream, warps, stages = cfg.blocks(kernel)
    if stages > 2:
        stages -= 1
    elif stream > 32:
        stream //= 2
    elif res > 64:
        res //= 2
        warps = min(warps, 4)
    elif stages > 1:
        stages = 1
    elif stream > 16:
        stream //= 2
    elif res > 16:
        res //= 2
    else:
        return None
    return cfg.with_blocks(kernel, res, stream, warps, stages)


def fit_shared_memory(cfg: HierAttnConfig, head_dim: int, elem_size: int, limit: int) -> HierAttnConfig:
    """``cfg`` with each kernel shrunk until its estimated shared memory is at most ``limit`` bytes."""
    for kernel in KERNELS:
        while shared_memory_bytes(cfg, kernel, head_dim, elem_size) > limit:
            smaller = shrink(cfg, kernel)
            if smaller is None:
                break
            cfg = smaller
    return cfg


def max_shared_memory(device) -> int:
    """Shared memory per block (opt-in maximum) of a CUDA device, in bytes; cached per device."""
    device = torch.device(device)
    return _max_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _max_shared_memory(index: int) -> int:
    try:
        import triton

        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # pragma: no cover - depends on the driver
        return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


_CHOSEN: dict = {}  # (device, dtype, head dim) -> config, after choose_config or an out-of-resources retry


def choose_config(dtype: torch.dtype, head_dim: int, device) -> HierAttnConfig:
    """The default configuration for (dtype, head dim) that fits the device's shared memory (the interpreter's
    small blocks under TRITON_INTERPRET=1)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return HierAttnConfig.for_interpreter()
    device = torch.device(device)
    key = (str(device), dtype, head_dim)
    cfg = _CHOSEN.get(key)
    if cfg is None:
        elem = torch.empty((), dtype=dtype).element_size()
        limit = max_shared_memory(device) if device.type == "cuda" else 1 << 30
        cfg = _CHOSEN[key] = fit_shared_memory(HierAttnConfig(), head_dim, elem, limit)
    return cfg


def remember_config(dtype: torch.dtype, head_dim: int, device, cfg: HierAttnConfig) -> None:
    """Record ``cfg`` as the choice for (device, dtype, head dim) (after a kernel was shrunk at launch)."""
    _CHOSEN[(str(torch.device(device)), dtype, head_dim)] = cfg
