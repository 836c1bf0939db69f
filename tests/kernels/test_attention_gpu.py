"""GPU correctness of the Triton kernels (bf16 / fp16 / fp32) against the reference; skipped without CUDA.

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


@pytest.mark.parametrize("d", [64, 128])
def test_auto_float32_fits_shared_memory_and_matches(d):
    """A float32 model with implementation="auto": the chosen configuration fits the device's shared memory (the
    tuned 16-bit blocks in 4-byte elements need 262,144 B for the forward at D = 128; an H200 has 232,448)."""
    from sophia_kernels import HierLayout, hierarchical_attention

    layout, n = HierLayout.from_segments([[[64, ("video", 4), 100]]], tokens_per_frame=256)
    g = torch.Generator(device="cuda").manual_seed(d)
    q, k, v = (torch.randn(1, h, n, d, device="cuda", generator=g).requires_grad_(True) for h in (4, 2, 2))
    do = torch.randn(1, 4, n, d, device="cuda", generator=g)
    out = hierarchical_attention(q, k, v, layout)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = hierarchical_attention(q64, k64, v64, layout, implementation="reference")
    rgrads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for x, y, tol in [(out, ref, 2e-3)] + [(a, b, 5e-3) for a, b in zip(grads, rgrads)]:
        assert float((x.double() - y).norm() / y.norm()) < tol


def test_gpu_check_float32_case():
    from sophia_kernels.gpu_check import check_case, make_cases

    case = next(c for c in make_cases() if c[0] == "fp32_rand_M256_D128")
    res = check_case(case, seed=0)
    assert res["pass"], res


@pytest.mark.parametrize("frames", [8, 2048])
def test_int64_row_offsets_on_decoder_views_match_int32(monkeypatch, frames):
    """bf16 decoder views [B, N, H, D] -> [B, H, N, D] (no copy), O and dQ/dK/dV in those layouts. 8 frames: int64 row
    offsets forced (INT64_OFFSETS_FROM = 0) against the int32 kernels, bitwise. 2,048 frames (524,352 tokens, row
    stride 4096: int64 chosen by itself) against the same inputs made contiguous [B, H, N, D] (int32 kernels)."""
    from sophia_kernels import HierLayout, hierarchical_attention
    from sophia_kernels.ops import hier_attention_triton as H

    layout, n = HierLayout.from_segments([[[32, ("video", frames), 32]]], tokens_per_frame=256)
    g = torch.Generator(device="cuda").manual_seed(frames)
    q, k, v, do = (torch.randn(1, n, h, 128, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                   for h in (32, 8, 8, 32))
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))

    def run(q, k, v, do):
        out = hierarchical_attention(q, k, v, layout)
        return (out,) + torch.autograd.grad(out, (q, k, v), do)

    if frames == 8:
        want = run(q, k, v, do)
        monkeypatch.setattr(H, "INT64_OFFSETS_FROM", 0)
    else:
        assert H._int64(n, q)
        qc, kc, vc = (t.detach().contiguous().requires_grad_(True) for t in (q, k, v))
        want = run(qc, kc, vc, do.contiguous())
        del qc, kc, vc
    got = run(q, k, v, do)
    for x, y, like in zip(got, want, (q, q, k, v)):
        assert x.stride() == like.stride()
        assert torch.equal(x, y)


@pytest.mark.parametrize("frames", [8, 512])
def test_inference_output_over_q_equals_the_allocated_output(frames):
    """out=q on the GPU, where tiles run concurrently: the same bits as a separate output, on the decoder's
    [B, N, H, D] views (512 frames: 131K tokens, every tile in flight at once somewhere)."""
    from sophia_kernels import HierLayout, hierarchical_attention

    layout, n = HierLayout.from_segments([[[64, ("video", frames), 64]]], tokens_per_frame=256)
    torch.manual_seed(frames)
    q = torch.randn(1, n, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    v = torch.randn(1, n, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    with torch.no_grad():
        expected = hierarchical_attention(q, k, v, layout)
        out = hierarchical_attention(q, k, v, layout, out=q)
    assert out.data_ptr() == q.data_ptr()
    assert torch.equal(out, expected)
