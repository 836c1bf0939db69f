"""Reference hierarchical attention vs an independent dense-mask oracle (float64, CPU)."""

import random

import pytest
import torch

from layouts import random_layout
from sophia_kernels import HierLayout, hierarchical_attention, level_counts


# ---------------------------------------------------------------------------------------------- oracle
def _counts(frames, arity, levels):
    out = [frames]
    while len(out) < levels and out[-1] > 1:
        out.append((out[-1] + arity - 1) // arity)
    return out


def oracle_mask(layout: HierLayout, batch: int, n: int) -> torch.Tensor:
    """Bool [B, N, N] built from the rule (docs/hierarchical_attention.md), pair by pair (vectorized)."""
    m, a, e, lv = layout.tokens_per_frame, layout.arity, layout.neighbours, layout.levels
    seq = torch.full((batch, n), -1)
    vid = torch.full((batch, n), -1)
    lev = torch.full((batch, n), -1)
    frm = torch.full((batch, n), -1)
    vst = torch.full((batch, n), -1)
    for j, (r, s0, s1) in enumerate(layout.seqs.tolist()):
        seq[r, s0:s1] = j
    for i, (r, st, f) in enumerate(layout.videos.tolist()):
        pos = st
        for lvl, c in enumerate(_counts(f, a, lv)):
            for fr in range(c):
                sl = slice(pos, pos + m)
                vid[r, sl], lev[r, sl], frm[r, sl], vst[r, sl] = i, lvl, fr, st
                pos += m
    pos_ = torch.arange(n)
    qi = lambda t: t[:, :, None]  # noqa: E731
    ki = lambda t: t[:, None, :]  # noqa: E731
    same_seq = (qi(seq) == ki(seq)) & (qi(seq) >= 0)
    k_agg = ki(lev) >= 1
    q_text = qi(vid) < 0
    text_rule = q_text & (ki(pos_[None].expand(batch, n)) <= qi(pos_[None].expand(batch, n))) & ~k_agg
    before = (ki(pos_[None].expand(batch, n)) < qi(vst)) & ~k_agg
    same_vid = qi(vid) == ki(vid)
    dl = ki(lev) - qi(lev)
    window = (dl == 0) & ((qi(frm) - ki(frm)).abs() <= e)
    parent = (dl == 1) & (ki(frm) == torch.div(qi(frm), a, rounding_mode="floor"))
    child = (dl == -1) & (torch.div(ki(frm), a, rounding_mode="floor") == qi(frm))
    video_rule = ~q_text & (before | (same_vid & (window | parent | child)))
    return same_seq & (text_rule | video_rule)


def oracle_attention(q, k, v, mask, scale):
    b, hq, n, d = q.shape
    g = hq // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no key (padding) -> 0
    return torch.einsum("bhqk,bhkd->bhqd", p, vv)


def _check(layout, n, hq, hkv, d, seed):
    torch.manual_seed(seed)
    b = int(layout.seqs[:, 0].max()) + 1 if layout.num_seqs else 1
    q = torch.randn(b, hq, n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, n, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, n, d, dtype=torch.float64, requires_grad=True)
    do = torch.randn(b, hq, n, d, dtype=torch.float64)
    scale = d ** -0.5
    mask = oracle_mask(layout, b, n)
    ref = oracle_attention(q, k, v, mask, scale)
    gr = torch.autograd.grad(ref, (q, k, v), do)
    out = hierarchical_attention(q, k, v, layout, implementation="reference")
    go = torch.autograd.grad(out, (q, k, v), do)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for x, y in zip(go, gr):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9)
    return mask


# ---------------------------------------------------------------------------------------------- tests
def test_level_counts():
    assert level_counts(1, 2, 4) == [1]
    assert level_counts(5, 2, 4) == [5, 3, 2, 1]
    assert level_counts(16, 2, 4) == [16, 8, 4, 2]
    assert level_counts(7, 3, 1) == [7]
    assert level_counts(2, 2, 9) == [2, 1]
    with pytest.raises(ValueError):
        level_counts(0, 2, 4)


@pytest.mark.parametrize("seed", range(12))
def test_reference_matches_oracle_random_layouts(seed):
    rng = random.Random(seed)
    layout, n = random_layout(rng)
    hq, hkv = rng.choice([(2, 2), (4, 2), (4, 1), (3, 3)])
    _check(layout, n, hq, hkv, rng.choice([4, 8]), seed)


def test_single_video_with_text_around():
    layout, n = HierLayout.from_segments([[[5, ("video", 9), 4]]], tokens_per_frame=3, arity=2, levels=4,
                                         neighbours=2)
    _check(layout, n, 4, 2, 8, 0)


def test_no_videos_is_plain_causal():
    layout, n = HierLayout.from_segments([[[13]], [[7], ("pad", 2), [4]]], tokens_per_frame=4)
    mask = _check(layout, n, 2, 1, 8, 1)
    tri = torch.ones(13, 13, dtype=torch.bool).tril()
    assert torch.equal(mask[0], tri)


def test_trapezoid_and_large_levels():
    # 1 frame (single level), 3 frames with L = 10 (stops at 1), arity 3
    layout, n = HierLayout.from_segments([[[2, ("video", 1), 1, ("video", 3), ("video", 5)]]], tokens_per_frame=2,
                                         arity=3, levels=10, neighbours=1)
    _check(layout, n, 2, 2, 4, 2)


def test_padding_outputs_and_grads_are_zero():
    layout, n = HierLayout.from_segments([[("pad", 3), [2, ("video", 3)], ("pad", 2), [3]], [[4]]],
                                         tokens_per_frame=2)
    torch.manual_seed(0)
    q = torch.randn(2, 4, n, 8, requires_grad=True)
    k = torch.randn(2, 2, n, 8, requires_grad=True)
    v = torch.randn(2, 2, n, 8, requires_grad=True)
    out = hierarchical_attention(q, k, v, layout, implementation="reference")
    assert out.dtype == q.dtype and out.shape == q.shape
    out.sum().backward()
    pad = torch.ones(2, n, dtype=torch.bool)
    for r, s0, s1 in layout.seqs.tolist():
        pad[r, s0:s1] = False
    assert pad.sum() > 0
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.all(t.detach().permute(0, 2, 1, 3)[pad] == 0)
    assert torch.all(out.permute(0, 2, 1, 3)[~pad].abs().sum(-1) > 0)


def test_bf16_input_returns_bf16():
    layout, n = HierLayout.from_segments([[[3, ("video", 4), 2]]], tokens_per_frame=2)
    q = torch.randn(1, 2, n, 8, dtype=torch.bfloat16)
    k = torch.randn(1, 1, n, 8, dtype=torch.bfloat16)
    out = hierarchical_attention(q, k, k, layout)
    assert out.dtype == torch.bfloat16
    ref = hierarchical_attention(q.double(), k.double(), k.double(), layout)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-2


def test_small_budget_chunking_is_exact():
    from sophia_kernels import hierarchical_attention_reference

    layout, n = HierLayout.from_segments([[[6, ("video", 5), 3, ("video", 2), 4]]], tokens_per_frame=4)
    torch.manual_seed(3)
    q = torch.randn(1, 2, n, 8, dtype=torch.float64)
    k = torch.randn(1, 2, n, 8, dtype=torch.float64)
    v = torch.randn(1, 2, n, 8, dtype=torch.float64)
    big = hierarchical_attention_reference(q, k, v, layout)
    small = hierarchical_attention_reference(q, k, v, layout, budget=50)
    torch.testing.assert_close(big, small, rtol=1e-12, atol=1e-12)


def test_allowed_pairs_matches_oracle():
    rng = random.Random(7)
    for _ in range(5):
        layout, n = random_layout(rng)
        b = int(layout.seqs[:, 0].max()) + 1
        assert layout.allowed_pairs() == int(oracle_mask(layout, b, n).sum())


@pytest.mark.parametrize(
    "seqs,videos,match",
    [
        ([(0, 0, 10)], [(0, 2, 0)], "frames"),
        ([(0, 0, 10)], [(0, 4, 3)], "not inside one sequence"),  # 3 frames -> 6 frames of 2 tokens: [4, 16)
        ([(0, 0, 6), (0, 6, 12)], [(0, 4, 2)], "not inside one sequence"),
        ([(0, 0, 12)], [(0, 0, 2), (0, 4, 1)], "overlap"),
        ([(0, 0, 8), (0, 6, 12)], [], "overlap"),
        ([(0, 0, 40)], [], "row length"),
        ([(3, 0, 4)], [], "row outside"),
        ([(0, 5, 5)], [], "start < end"),
    ],
)
def test_invalid_layouts_raise(seqs, videos, match):
    layout = HierLayout.from_lists(seqs, videos, tokens_per_frame=2, arity=2, levels=4, neighbours=2)
    q = torch.randn(1, 2, 12, 4)
    with pytest.raises(ValueError, match=match):
        hierarchical_attention(q, q, q, layout, implementation="reference")


def test_bad_shapes_raise():
    layout, n = HierLayout.from_segments([[[4]]], tokens_per_frame=2)
    q = torch.randn(1, 3, n, 4)
    k = torch.randn(1, 2, n, 4)
    with pytest.raises(ValueError, match="multiple"):
        hierarchical_attention(q, k, k, layout)
    with pytest.raises(ValueError, match="implementation"):
        hierarchical_attention(q, q, q, layout, implementation="nope")
    with pytest.raises(ValueError):
        HierLayout.from_lists([(0, 0, 4, 1)], [], tokens_per_frame=2)
