"""GPU correctness of the Triton kernels (bf16 / fp16) against the reference; skipped without CUDA.

The full check with the reference shape is ``python -m sophia_kernels.gpu_check``.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _cases():
    if not torch.cuda.is_available():
        return []
    from sophia_kernels.gpu_check import make_cases

    return make_cases(quick=True)


@pytest.mark.parametrize("idx", range(5))
def test_triton_gpu_matches_reference(idx):
    from sophia_kernels.gpu_check import check_case

    cases = _cases()
    if idx >= len(cases):
        pytest.skip("no such case")
    res = check_case(cases[idx], seed=idx)
    assert res["pass"], res


def test_auto_uses_triton_on_cuda_and_matches():
    from sophia_kernels import HierLayout, hierarchical_attention

    layout, n = HierLayout.from_segments([[[64, ("video", 4), 64]]], tokens_per_frame=256)
    q = torch.randn(1, 4, n, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, n, 128, device="cuda", dtype=torch.bfloat16)
    out = hierarchical_attention(q, k, k, layout)
    ref = hierarchical_attention(q.float(), k.float(), k.float(), layout, implementation="reference")
    assert ((out.float() - ref).norm() / ref.norm()) < 1e-2
