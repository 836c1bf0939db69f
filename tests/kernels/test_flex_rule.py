"""The benchmark's FlexAttention baseline uses exactly the hierarchical rule: its chunk-wise BlockMask equals
``create_block_mask``'s, and flex_attention with it equals the reference (CPU, small shapes)."""

import pytest
import torch

from sophia_kernels import HierLayout, hierarchical_attention_reference

flex = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.parametrize("rows, m", [([[[64, ("video", 6), 64]]], 256),
                                     ([[[0, ("video", 5), 100, ("video", 3), 28]]], 128)])
def test_flex_block_mask_is_the_hierarchical_rule(rows, m):
    from sophia_kernels.benchmark import flex_block_mask, flex_mask_mod

    layout, n = HierLayout.from_segments(rows, tokens_per_frame=m)
    mask_mod = flex_mask_mod(layout, n, device="cpu")
    got = flex_block_mask(mask_mod, n, device="cpu", chunk_elems=1 << 20)
    ref = flex.create_block_mask(mask_mod, 1, 1, n, n, device="cpu")
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    out = flex.flex_attention(q, k, v, block_mask=got)
    expect = hierarchical_attention_reference(q, k, v, layout)
    assert float((out - expect).norm() / expect.norm()) < 1e-5
