"""Public entry point: ``hierarchical_attention`` (docs/hierarchical_attention.md).

Decoding needs nothing from here: after prefill no text token reads an aggregated token's keys or values, so the
KV cache can drop them and decoding is plain causal attention over text and level-0 tokens (use SDPA / flash with
``is_causal`` semantics over the cache). ``plain_token_mask`` gives the positions to keep in the cache.
"""

from __future__ import annotations

import torch

from .layout import HierLayout
from .reference import check_inputs, hierarchical_attention_reference

__all__ = ["hierarchical_attention", "triton_available", "plain_token_mask"]

_IMPLEMENTATIONS = ("auto", "reference", "triton")


def triton_available(device: torch.device | str | None = None) -> bool:
    """True when the Triton kernels can run on ``device`` (CUDA, triton importable)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


def _triton_supports(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return q.dtype in (torch.float16, torch.bfloat16, torch.float32) and d in (16, 32, 64, 128)


def hierarchical_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: HierLayout, *,
                           scale: float | None = None, implementation: str = "auto",
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Hierarchical attention over packed sequences with videos.

    q: [B, Hq, N, D]; k, v: [B, Hkv, N, D] with Hq % Hkv == 0 (GQA). Returns [B, Hq, N, D] in q's dtype.
    ``implementation``: "auto" (Triton on CUDA when available and the shape is supported, else the reference),
    "reference" (plain PyTorch) or "triton". Padding query positions output exactly 0 and get zero gradients;
    nothing attends to padding or across packed sequences. Default scale is D ** -0.5; softmax in float32.
    ``out``: write the result into this [B, Hq, N, D] tensor of q's dtype and return it; it may be ``q`` itself
    (every query tile is read before its output is written), which saves a q-sized tensor when q is not needed
    afterwards. Not differentiable: nothing may require grad.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    check_inputs(q, k, v, layout)
    if out is not None:
        _check_out(out, q)
    if implementation == "auto":
        use_triton = q.is_cuda and triton_available(q.device) and _triton_supports(q)
        implementation = "triton" if use_triton else "reference"
    if implementation == "reference":
        result = hierarchical_attention_reference(q, k, v, layout, scale=scale)
        return result if out is None else out.copy_(result)
    from .ops.hier_attention_triton import hier_attention_triton

    return hier_attention_triton(q, k, v, layout, scale=scale, out=out)


def _check_out(out: torch.Tensor, q: torch.Tensor) -> None:
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must match q ({tuple(q.shape)}, {q.dtype}, {q.device}); got {tuple(out.shape)}, "
                         f"{out.dtype}, {out.device}")
    if torch.is_grad_enabled() and (out.requires_grad or q.requires_grad):
        raise ValueError("out= is for inference: the output written in place has no gradient; call without out= "
                         "(or under torch.no_grad())")


def plain_token_mask(layout: HierLayout, batch_size: int, seq_len: int, device=None) -> torch.Tensor:
    """Bool [B, N]: True for tokens that stay in the KV cache after prefill (text and level-0 video tokens of
    some sequence); False for aggregated tokens (level >= 1) and padding."""
    meta = layout.token_metadata(batch_size, seq_len, device=device)
    return (meta["seq"] >= 0) & (meta["level"] <= 0)
