"""Liger-Kernel in Sophia's decoder: fused RMSNorm, SwiGLU and RoPE (Triton, CUDA).

At 100K+ tokens the decoder's element-wise work (RMSNorm in float32, SiLU(gate) * up over [tokens x MLP width],
RoPE's temporaries) moves more memory than its matmuls need time for; Liger's kernels do each in one pass. Two
ways in, as for any model Liger supports:
- training: `swift sft --use_liger_kernel true` (transformers' Trainer looks the model type up in Liger's table,
  where `register()` puts `sophia`);
- inference: config `liger_kernel` (`--model_kwargs '{"sophia_liger_kernel": true}'` or SOPHIA_LIGER_KERNEL=1).
Only the decoder's position-wise ops change. Sophia's label-position loss already avoids [tokens x vocab] logits,
so Liger's (fused linear) cross-entropy is not used. Sophia's sequence chunking then wraps Liger's MLP, whose gate
and up projections are still [tokens x MLP width]; Liger's RMSNorm and in-place RoPE need no chunking.
"""
from __future__ import annotations

import importlib.util

from torch import nn

from .chunking import chunk_positionwise_layers, is_liger

MODEL_TYPE = "sophia"


def available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def apply_liger_kernel_to_sophia(model: nn.Module = None, rope: bool = True, rms_norm: bool = True,
                                 swiglu: bool = True, **_ignored) -> None:
    """Patch the decoder of a loaded Sophia model (`SophiaForConditionalGeneration` or `SophiaModel`)."""
    if model is None:
        raise ValueError("Sophia's Liger kernels are applied to a loaded model instance (model=...)")
    if not available():
        raise ImportError("liger_kernel is not installed: pip install 'swift-sophia[liger]' (or liger-kernel)")
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    sophia = getattr(model, "model", model)
    decoder = sophia.language_model
    _apply_liger_kernel_to_instance(model=decoder, rope=rope, rms_norm=rms_norm, swiglu=swiglu, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    chunk_positionwise_layers(decoder, sophia.config)  # Liger replaced the forwards that chunking had wrapped


def register() -> bool:
    """Put `sophia` in Liger's model-type table (what `--use_liger_kernel true` consults). False without Liger."""
    if not available():
        return False
    from liger_kernel.transformers import monkey_patch

    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN[MODEL_TYPE] = apply_liger_kernel_to_sophia
    return True


__all__ = ["apply_liger_kernel_to_sophia", "register", "available", "is_liger"]
