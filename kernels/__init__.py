"""sophia_kernels: hierarchical attention for Sophia (docs/hierarchical_attention.md).

    from sophia_kernels import HierLayout, hierarchical_attention, level_counts

Depends only on torch; triton is imported lazily by the "triton" implementation.
"""

from .attention import hierarchical_attention, plain_token_mask, triton_available
from .layout import HierLayout, VideoSpan, check_hierarchy, level_counts
from .reference import hierarchical_attention_reference

__all__ = [
    "HierLayout",
    "check_hierarchy",
    "VideoSpan",
    "hierarchical_attention",
    "hierarchical_attention_reference",
    "level_counts",
    "plain_token_mask",
    "triton_available",
]
