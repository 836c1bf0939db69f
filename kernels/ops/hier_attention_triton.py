"""Triton kernels of hierarchical attention (docs/hierarchical_attention.md), in the shape of Triton's
fused-attention tutorial: flash-attention-2 style forward, dQ and dK/dV kernels plus their host wrappers.

Each program handles one tile of the plan (``tile_plan.py``: which tokens a tile holds and which key or query
ranges it meets; the descriptor columns are named by ``Col``) and one head:

* ``_attn_fwd`` (query tile x query head): online softmax over the tile's key ranges; writes O and the row
  log-sum-exp (base 2) LSE.
* ``_attn_bwd_dq`` (query tile x query head): delta = rowsum(dO * O), then dQ over the same key ranges.
* ``_attn_bwd_dkdv`` (key tile x kv head): dK, dV over the tile's query ranges, for every query head of the GQA
  group; ``_split_reduce`` sums the pieces of key tiles that the plan split (deterministic, no atomics).

Key ranges of a query tile, walked in this order: the plain prefix (segments before the tile), the hierarchy ranges
W, P, C (video tiles), the causal diagonal (text tiles). When every tile has at most ``tile_plan.PRE_SLOTS`` (3) prefix
segments (always, with at most two videos per sequence) the prefix slots and W, P, C are ONE flat loop whose block
addresses are pure functions of the loop index (Triton pipelines it: ``_flat_block``); otherwise the general path
walks any number of prefix segments in a nested loop. Masks are compile-time variants chosen from the power-of-two
alignment of all range lengths (aligned layouts run unmasked); a misaligned prefix (or later-token range on the
key side) gets its own masked loop so that the hierarchy loop stays unmasked (SPLIT_PRE, SPLIT_X).

No mask or block table of size N^2 exists anywhere; counts are runtime integers (no recompilation per layout).
Padding tiles write zeros (output, dQ, dK, dV).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from ..layout import HierLayout
from ..reference import check_inputs
from .config import HierAttnConfig, choose_config, remember_config, shrink
from .tile_plan import KIND_PAD, RDESC_COLS, Col, Plan, build_plan

__all__ = ["hier_attention_triton", "HierAttnConfig", "build_plan", "choose_config"]

LOG2E = 1.4426950408889634

# Row offsets (row * row stride) are int32 in the kernels unless some tensor's row stride * N reaches this; then the
# kernels compile with INT64_OFFSETS (int64 row terms). Strided inputs are never copied for it. Tests set it to 0.
INT64_OFFSETS_FROM = 2**31

# descriptor columns as compile-time constants for the kernels (tile_plan.Col)
D_COLS = tl.constexpr(Col.COUNT)
D_KIND = tl.constexpr(Col.KIND)
D_ROW = tl.constexpr(Col.ROW)
D_START = tl.constexpr(Col.START)
D_END = tl.constexpr(Col.END)
D_SEQ_START = tl.constexpr(Col.SEQ_START)
D_VID_LO = tl.constexpr(Col.VID_LO)
D_NPREV = tl.constexpr(Col.NPREV)
D_LIMIT = tl.constexpr(Col.LIMIT)
D_X0 = tl.constexpr(Col.X0)
D_X1 = tl.constexpr(Col.X1)
D_W0 = tl.constexpr(Col.W0)
D_W1 = tl.constexpr(Col.W1)
D_P0 = tl.constexpr(Col.P0)
D_P1 = tl.constexpr(Col.P1)
D_C0 = tl.constexpr(Col.C0)
D_C1 = tl.constexpr(Col.C1)
D_DIAG0 = tl.constexpr(Col.DIAG0)
D_DIAG1 = tl.constexpr(Col.DIAG1)
D_PRE = tl.constexpr(Col.PRE)
D_SLOT = tl.constexpr(Col.SLOT)
T_PAD = tl.constexpr(KIND_PAD)
R_COLS = tl.constexpr(RDESC_COLS)


# ============================================================================================== shared helpers
@triton.jit
def _rows(base, rows, stride, offs_d, INT64: tl.constexpr):
    """Pointers to the rows ``rows`` of a [rows, D] matrix with row stride ``stride``. INT64: the row term in int64
    (rows * stride reaches 2**31 for strided inputs of long sequences, e.g. a [B, N, H, D] tensor seen as
    [B, H, N, D] has stride H * D per token: 4096 x 524,288 tokens); otherwise int32 (the host picks INT64 only when
    some stride * N >= 2**31, so the common case compiles to the code it always had)."""
    if INT64:
        return base + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
    else:
        return base + rows[:, None] * stride + offs_d[None, :]


@triton.jit
def _load_kv(k_base, v_base, skn, svn, offs_k, offs_d, kend, MASK_END: tl.constexpr, INT64: tl.constexpr):
    """K and V rows ``offs_k`` (rows >= kend read as zero when MASK_END)."""
    if MASK_END:
        kmask = offs_k < kend
        k = tl.load(_rows(k_base, offs_k, skn, offs_d, INT64), mask=kmask[:, None], other=0.0)
        v = tl.load(_rows(v_base, offs_k, svn, offs_d, INT64), mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(_rows(k_base, offs_k, skn, offs_d, INT64))
        v = tl.load(_rows(v_base, offs_k, svn, offs_d, INT64))
    return k, v


@triton.jit
def _hier_ranges(desc):
    """Hierarchy ranges W, P, C and the causal diagonal of a tile."""
    w0 = tl.load(desc + D_W0)
    w1 = tl.load(desc + D_W1)
    p0 = tl.load(desc + D_P0)
    p1 = tl.load(desc + D_P1)
    c0 = tl.load(desc + D_C0)
    c1 = tl.load(desc + D_C1)
    d0 = tl.load(desc + D_DIAG0)
    d1 = tl.load(desc + D_DIAG1)
    return w0, w1, p0, p1, c0, c1, d0, d1


@triton.jit
def _flat_ranges(desc, w0, w1, p0, p1, c0, c1, BLOCK_N: tl.constexpr):
    """The prefix slots a, e, f of a query tile, and the running block counts n1..n6 of the flat loop over a, e, f,
    W, P, C (blocks [n_{j-1}, n_j) of the loop belong to range j)."""
    a0 = tl.load(desc + D_PRE + 0)
    a1 = tl.load(desc + D_PRE + 1)
    e0 = tl.load(desc + D_PRE + 2)
    e1 = tl.load(desc + D_PRE + 3)
    f0 = tl.load(desc + D_PRE + 4)
    f1 = tl.load(desc + D_PRE + 5)
    n1 = tl.cdiv(a1 - a0, BLOCK_N)
    n2 = n1 + tl.cdiv(e1 - e0, BLOCK_N)
    n3 = n2 + tl.cdiv(f1 - f0, BLOCK_N)
    n4 = n3 + tl.cdiv(w1 - w0, BLOCK_N)
    n5 = n4 + tl.cdiv(p1 - p0, BLOCK_N)
    n6 = n5 + tl.cdiv(c1 - c0, BLOCK_N)
    return a0, a1, e0, e1, f0, f1, n1, n2, n3, n4, n5, n6


@triton.jit
def _prefix_block(i, a0, a1, e0, e1, f0, f1, n1, n2, BLOCK_N: tl.constexpr):
    """(first key, range end) of block i of the prefix slots a, e, f (SPLIT_PRE loop)."""
    base = tl.where(i < n1, a0, tl.where(i < n2, e0 - n1 * BLOCK_N, f0 - n2 * BLOCK_N))
    kend = tl.where(i < n1, a1, tl.where(i < n2, e1, f1))
    return base + i * BLOCK_N, kend


@triton.jit
def _flat_block(i, a0, a1, e0, e1, f0, f1, w0, w1, p0, p1, c0, c1, n1, n2, n3, n4, n5, BLOCK_N: tl.constexpr):
    """(first key, range end) of block i of the flat loop (a, e, f, W, P, C): pure functions of i, no branch."""
    base = tl.where(i < n1, a0, tl.where(i < n2, e0 - n1 * BLOCK_N, tl.where(
        i < n3, f0 - n2 * BLOCK_N, tl.where(i < n4, w0 - n3 * BLOCK_N, tl.where(
            i < n5, p0 - n4 * BLOCK_N, c0 - n5 * BLOCK_N)))))
    kend = tl.where(i < n1, a1, tl.where(i < n2, e1, tl.where(i < n3, f1, tl.where(
        i < n4, w1, tl.where(i < n5, p1, c1)))))
    return base + i * BLOCK_N, kend


@triton.jit
def _prefix_segment(VID_L0END, VID_END, vid_lo, j, nprev, limit):
    """General path: (end of plain segment j, start of segment j + 1). Segment j < nprev ends at the level-0 end of
    the sequence's video j and the next starts after that video's extended span; the last one ends at ``limit``."""
    has_vid = j < nprev
    seg_end = tl.load(VID_L0END + vid_lo + j, mask=has_vid, other=0)
    seg_end = tl.where(has_vid, seg_end, limit)
    nxt = tl.load(VID_END + vid_lo + j, mask=has_vid, other=0)
    nxt = tl.where(has_vid, nxt, limit)
    return seg_end, nxt


@triton.jit
def _hier_block(i, w0, w1, p0, p1, c0, c1, nw, nwp, BLOCK_N: tl.constexpr):
    """General path: (first key, range end) of block i of the hierarchy ranges W, P, C."""
    in_p = i >= nw
    in_c = i >= nwp
    base = tl.where(in_c, c0 - nwp * BLOCK_N, tl.where(in_p, p0 - nw * BLOCK_N, w0))
    kend = tl.where(in_c, c1, tl.where(in_p, p1, w1))
    return base + i * BLOCK_N, kend


# ============================================================================================== forward
@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, kstart, kend, offs_m, offs_n, offs_d, qk_scale,
               MASK_END: tl.constexpr, CAUSAL: tl.constexpr, INT64: tl.constexpr):
    """Online-softmax update of one query tile with the key block [kstart, kstart + BLOCK_N) (scores in base 2)."""
    offs_k = kstart + offs_n
    k, v = _load_kv(k_base, v_base, skn, svn, offs_k, offs_d, kend, MASK_END, INT64)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if MASK_END:
        qk = tl.where(offs_k[None, :] < kend, qk, float("-inf"))
    if CAUSAL:
        qk = tl.where(offs_k[None, :] <= offs_m[:, None], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, QDESC, VID_L0END, VID_END,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
              Hq, N, qk_scale,
              G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              RANGE_MASK: tl.constexpr, FLAT: tl.constexpr, SPLIT_PRE: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """O and LSE of one query tile and query head.

    FLAT: one loop over the blocks of six key ranges (<= 3 prefix segments, W, P, C) read from the descriptor;
    otherwise the general path walks any number of prefix segments (nested loop). RANGE_MASK: some range length is
    not a multiple of BLOCK_N (mask the key end). SPLIT_PRE: the prefix slots in their own, masked loop."""
    pid = tl.program_id(0)
    t = pid // Hq
    h = pid % Hq
    hk = h // G
    desc = QDESC + t * D_COLS
    kind = tl.load(desc + D_KIND)
    b = tl.load(desc + D_ROW)
    q0 = tl.load(desc + D_START)
    q1 = tl.load(desc + D_END)
    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    qmask = offs_m < q1
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    row_stat = (b64 * Hq + h64) * N  # LSE is [B, Hq, N] float32
    o_ptrs = _rows(O + b64 * sob + h64 * soh, offs_m, son, offs_d, INT64_OFFSETS)
    if kind == T_PAD:
        tl.store(o_ptrs, tl.zeros([BLOCK_M, HEAD_D], dtype=o_ptrs.dtype.element_ty), mask=qmask[:, None])
    else:
        w0, w1, p0, p1, c0, c1, d0, d1 = _hier_ranges(desc)
        q = tl.load(_rows(Q + b64 * sqb + h64 * sqh, offs_m, sqn, offs_d, INT64_OFFSETS), mask=qmask[:, None],
                    other=0.0)
        k_base = K + b64 * skb + hk64 * skh
        v_base = V + b64 * svb + hk64 * svh
        acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if FLAT:
            # ---- one flat loop over prefix segments a, e, f and the hierarchy ranges W, P, C
            a0, a1, e0, e1, f0, f1, n1, n2, n3, n4, n5, n6 = _flat_ranges(desc, w0, w1, p0, p1, c0, c1, BLOCK_N)
            n_lo = 0
            if SPLIT_PRE:  # misaligned prefix (text lengths) but aligned hierarchy: mask only the prefix loop
                for i in range(0, n3):
                    ks, kend = _prefix_block(i, a0, a1, e0, e1, f0, f1, n1, n2, BLOCK_N)
                    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, ks, kend, offs_m,
                                               offs_n, offs_d, qk_scale, True, False, INT64_OFFSETS)
                n_lo = n3
            for i in range(n_lo, n6):
                ks, kend = _flat_block(i, a0, a1, e0, e1, f0, f1, w0, w1, p0, p1, c0, c1, n1, n2, n3, n4, n5,
                                       BLOCK_N)
                acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, ks, kend, offs_m, offs_n,
                                           offs_d, qk_scale, RANGE_MASK, False, INT64_OFFSETS)
        else:
            # ---- general path, prefix: [s0, l0_end(v1)), [end(v1), l0_end(v2)), ..., [., limit)
            seg_start = tl.load(desc + D_SEQ_START)
            vid_lo = tl.load(desc + D_VID_LO)
            nprev = tl.load(desc + D_NPREV)
            limit = tl.load(desc + D_LIMIT)
            for j in range(0, nprev + 1):
                seg_end, nxt = _prefix_segment(VID_L0END, VID_END, vid_lo, j, nprev, limit)
                for ks in range(seg_start, seg_end, BLOCK_N):
                    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, ks, seg_end, offs_m,
                                               offs_n, offs_d, qk_scale, True, False, INT64_OFFSETS)
                seg_start = nxt
            # ---- general path, hierarchy W, P, C
            nw = tl.cdiv(w1 - w0, BLOCK_N)
            nwp = nw + tl.cdiv(p1 - p0, BLOCK_N)
            nc = tl.cdiv(c1 - c0, BLOCK_N)
            for i in range(0, nwp + nc):
                ks, kend = _hier_block(i, w0, w1, p0, p1, c0, c1, nw, nwp, BLOCK_N)
                acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, ks, kend, offs_m, offs_n,
                                           offs_d, qk_scale, RANGE_MASK, False, INT64_OFFSETS)
        # ---- diagonal of text tiles, causal (zero iterations for video tiles)
        for ks in range(d0, d1, BLOCK_N):
            acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, ks, d1, offs_m, offs_n, offs_d,
                                       qk_scale, True, True, INT64_OFFSETS)
        out = acc / l_i[:, None]
        tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=qmask[:, None])
        tl.store(LSE + row_stat + offs_m, m_i + tl.math.log2(l_i), mask=qmask)


# ============================================================================================== backward: dQ
@triton.jit
def _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, kstart, kend, offs_m, offs_n, offs_d, qk_scale,
              MASK_END: tl.constexpr, CAUSAL: tl.constexpr, INT64: tl.constexpr):
    """dQ of one query tile += dS K over the key block [kstart, kstart + BLOCK_N) (P recomputed from LSE)."""
    offs_k = kstart + offs_n
    k, v = _load_kv(k_base, v_base, skn, svn, offs_k, offs_d, kend, MASK_END, INT64)
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.math.exp2(qk - lse[:, None])
    if MASK_END:
        p = tl.where(offs_k[None, :] < kend, p, 0.0)
    if CAUSAL:
        p = tl.where(offs_k[None, :] <= offs_m[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, O, LSE, DO, DELTA, DQ, QDESC, VID_L0END, VID_END,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                 sdob, sdoh, sdon, sdqb, sdqh, sdqn,
                 Hq, N, qk_scale, sm_scale,
                 G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 RANGE_MASK: tl.constexpr, FLAT: tl.constexpr, SPLIT_PRE: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """dQ of one query tile and query head, over the same key ranges as ``_attn_fwd``; also writes
    DELTA = rowsum(dO * O), which the dK/dV kernel reads."""
    pid = tl.program_id(0)
    t = pid // Hq
    h = pid % Hq
    hk = h // G
    desc = QDESC + t * D_COLS
    kind = tl.load(desc + D_KIND)
    b = tl.load(desc + D_ROW)
    q0 = tl.load(desc + D_START)
    q1 = tl.load(desc + D_END)
    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    qmask = offs_m < q1
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    row_stat = (b64 * Hq + h64) * N  # LSE / DELTA are [B, Hq, N] float32
    dq_ptrs = _rows(DQ + b64 * sdqb + h64 * sdqh, offs_m, sdqn, offs_d, INT64_OFFSETS)
    if kind == T_PAD:
        tl.store(dq_ptrs, tl.zeros([BLOCK_M, HEAD_D], dtype=dq_ptrs.dtype.element_ty), mask=qmask[:, None])
    else:
        w0, w1, p0, p1, c0, c1, d0, d1 = _hier_ranges(desc)
        q = tl.load(_rows(Q + b64 * sqb + h64 * sqh, offs_m, sqn, offs_d, INT64_OFFSETS), mask=qmask[:, None],
                    other=0.0)
        k_base = K + b64 * skb + hk64 * skh
        v_base = V + b64 * svb + hk64 * svh
        do = tl.load(_rows(DO + b64 * sdob + h64 * sdoh, offs_m, sdon, offs_d, INT64_OFFSETS),
                     mask=qmask[:, None], other=0.0)
        o = tl.load(_rows(O + b64 * sob + h64 * soh, offs_m, son, offs_d, INT64_OFFSETS), mask=qmask[:, None],
                    other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + row_stat + offs_m, delta, mask=qmask)
        lse = tl.load(LSE + row_stat + offs_m, mask=qmask, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
        if FLAT:
            # ---- one flat loop over prefix segments a, e, f and the hierarchy ranges W, P, C
            a0, a1, e0, e1, f0, f1, n1, n2, n3, n4, n5, n6 = _flat_ranges(desc, w0, w1, p0, p1, c0, c1, BLOCK_N)
            n_lo = 0
            if SPLIT_PRE:  # misaligned prefix (text lengths) but aligned hierarchy: mask only the prefix loop
                for i in range(0, n3):
                    ks, kend = _prefix_block(i, a0, a1, e0, e1, f0, f1, n1, n2, BLOCK_N)
                    dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, ks, kend, offs_m, offs_n,
                                   offs_d, qk_scale, True, False, INT64_OFFSETS)
                n_lo = n3
            for i in range(n_lo, n6):
                ks, kend = _flat_block(i, a0, a1, e0, e1, f0, f1, w0, w1, p0, p1, c0, c1, n1, n2, n3, n4, n5,
                                       BLOCK_N)
                dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, ks, kend, offs_m, offs_n, offs_d,
                               qk_scale, RANGE_MASK, False, INT64_OFFSETS)
        else:
            # ---- general path, prefix: [s0, l0_end(v1)), [end(v1), l0_end(v2)), ..., [., limit)
            seg_start = tl.load(desc + D_SEQ_START)
            vid_lo = tl.load(desc + D_VID_LO)
            nprev = tl.load(desc + D_NPREV)
            limit = tl.load(desc + D_LIMIT)
            for j in range(0, nprev + 1):
                seg_end, nxt = _prefix_segment(VID_L0END, VID_END, vid_lo, j, nprev, limit)
                for ks in range(seg_start, seg_end, BLOCK_N):
                    dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, ks, seg_end, offs_m, offs_n,
                                   offs_d, qk_scale, True, False, INT64_OFFSETS)
                seg_start = nxt
            # ---- general path, hierarchy W, P, C
            nw = tl.cdiv(w1 - w0, BLOCK_N)
            nwp = nw + tl.cdiv(p1 - p0, BLOCK_N)
            nc = tl.cdiv(c1 - c0, BLOCK_N)
            for i in range(0, nwp + nc):
                ks, kend = _hier_block(i, w0, w1, p0, p1, c0, c1, nw, nwp, BLOCK_N)
                dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, ks, kend, offs_m, offs_n, offs_d,
                               qk_scale, RANGE_MASK, False, INT64_OFFSETS)
        # ---- diagonal of text tiles, causal (zero iterations for video tiles)
        for ks in range(d0, d1, BLOCK_N):
            dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, ks, d1, offs_m, offs_n, offs_d,
                           qk_scale, True, True, INT64_OFFSETS)
        tl.store(dq_ptrs, (dq * sm_scale).to(dq_ptrs.dtype.element_ty), mask=qmask[:, None])


# ============================================================================================== backward: dK, dV
@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sdon, qstart, qend, offs_kn, offs_m,
                offs_d, qk_scale, ROW_MASK: tl.constexpr, CAUSAL: tl.constexpr, INT64: tl.constexpr):
    """dK, dV of one key tile += the query block [qstart, qstart + BLOCK_M) of one head (transposed scores: k and v
    stay in registers as the A operands)."""
    offs_q = qstart + offs_m
    if ROW_MASK:
        qm = offs_q < qend
        q = tl.load(_rows(q_base, offs_q, sqn, offs_d, INT64), mask=qm[:, None], other=0.0)
        do = tl.load(_rows(do_base, offs_q, sdon, offs_d, INT64), mask=qm[:, None], other=0.0)
        lse = tl.load(lse_base + offs_q, mask=qm, other=float("inf"))
        delta = tl.load(delta_base + offs_q, mask=qm, other=0.0)
    else:
        q = tl.load(_rows(q_base, offs_q, sqn, offs_d, INT64))
        do = tl.load(_rows(do_base, offs_q, sdon, offs_d, INT64))
        lse = tl.load(lse_base + offs_q)
        delta = tl.load(delta_base + offs_q)
    qkT = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M]
    pT = tl.math.exp2(qkT - lse[None, :])
    if CAUSAL:
        pT = tl.where(offs_q[None, :] >= offs_kn[:, None], pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do)
    dpT = tl.dot(v, tl.trans(do))
    dsT = pT * (dpT - delta[None, :])
    dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit
def _dkdv_range(dk, dv, k, v, Q, DO, LSE, DELTA, b64, hk64, sqb, sqh, sqn, sdob, sdoh, sdon, Hq, N, r0, r1, offs_kn,
                offs_m, offs_d, qk_scale, G: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                INT64_OFFSETS: tl.constexpr):
    """The query blocks of one range [r0, r1) for each query head of the group, the range end masked."""
    nr = tl.cdiv(r1 - r0, BLOCK_M)
    for it in range(0, G * nr):
        g = it // nr
        i = it - g * nr
        h64 = hk64 * G + g
        row_stat = (b64 * Hq + h64) * N
        dk, dv = _dkdv_block(dk, dv, k, v, Q + b64 * sqb + h64 * sqh, DO + b64 * sdob + h64 * sdoh,
                             LSE + row_stat, DELTA + row_stat, sqn, sdon, r0 + i * BLOCK_M, r1,
                             offs_kn, offs_m, offs_d, qk_scale, True, CAUSAL, INT64_OFFSETS)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KDESC, WS_DK, WS_DV,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                   Hq, Hkv, N, qk_scale, sm_scale,
                   G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   RANGE_MASK: tl.constexpr, SPLIT_X: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """dK, dV of one key tile and kv head: one flat loop over (query head of the group) x (query blocks of the
    ranges X (later tokens), W, P, C), then the causal diagonal of text key tiles. SPLIT_X: X in its own masked
    loop, before the flat loop over W, P, C (RANGE_MASK then refers to W, P, C only). A piece of a split key tile
    (descriptor SLOT >= 0) writes fp32 partial sums to its workspace slot instead (``_split_reduce``)."""
    pid = tl.program_id(0)
    t = pid // Hkv
    hk = pid % Hkv
    desc = KDESC + t * D_COLS
    kind = tl.load(desc + D_KIND)
    b = tl.load(desc + D_ROW)
    k0 = tl.load(desc + D_START)
    k1 = tl.load(desc + D_END)
    offs_kn = k0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    kmask = offs_kn < k1
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    dk_ptrs = _rows(DK + b64 * sdkb + hk64 * sdkh, offs_kn, sdkn, offs_d, INT64_OFFSETS)
    dv_ptrs = _rows(DV + b64 * sdvb + hk64 * sdvh, offs_kn, sdvn, offs_d, INT64_OFFSETS)
    if kind == T_PAD:
        tl.store(dk_ptrs, tl.zeros([BLOCK_N, HEAD_D], dtype=dk_ptrs.dtype.element_ty), mask=kmask[:, None])
        tl.store(dv_ptrs, tl.zeros([BLOCK_N, HEAD_D], dtype=dv_ptrs.dtype.element_ty), mask=kmask[:, None])
    else:
        x0 = tl.load(desc + D_X0)
        x1 = tl.load(desc + D_X1)
        w0, w1, p0, p1, c0, c1, d0, d1 = _hier_ranges(desc)
        k = tl.load(_rows(K + b64 * skb + hk64 * skh, offs_kn, skn, offs_d, INT64_OFFSETS), mask=kmask[:, None],
                    other=0.0)
        v = tl.load(_rows(V + b64 * svb + hk64 * svh, offs_kn, svn, offs_d, INT64_OFFSETS), mask=kmask[:, None],
                    other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
        if SPLIT_X:
            # misaligned later-token range X (text lengths) but aligned hierarchy: mask only this loop
            dk, dv = _dkdv_range(dk, dv, k, v, Q, DO, LSE, DELTA, b64, hk64, sqb, sqh, sqn, sdob, sdoh, sdon, Hq, N,
                                 x0, x1, offs_kn, offs_m, offs_d, qk_scale, G, BLOCK_M, False, INT64_OFFSETS)
            n1 = 0
        else:
            n1 = tl.cdiv(x1 - x0, BLOCK_M)
        n2 = n1 + tl.cdiv(w1 - w0, BLOCK_M)
        n3 = n2 + tl.cdiv(p1 - p0, BLOCK_M)
        nb = n3 + tl.cdiv(c1 - c0, BLOCK_M)
        for it in range(0, G * nb):
            g = it // nb
            i = it - g * nb
            base = tl.where(i < n1, x0, tl.where(i < n2, w0 - n1 * BLOCK_M, tl.where(
                i < n3, p0 - n2 * BLOCK_M, c0 - n3 * BLOCK_M)))
            qend = tl.where(i < n1, x1, tl.where(i < n2, w1, tl.where(i < n3, p1, c1)))
            h64 = hk64 * G + g
            row_stat = (b64 * Hq + h64) * N
            dk, dv = _dkdv_block(dk, dv, k, v, Q + b64 * sqb + h64 * sqh, DO + b64 * sdob + h64 * sdoh,
                                 LSE + row_stat, DELTA + row_stat, sqn, sdon, base + i * BLOCK_M, qend,
                                 offs_kn, offs_m, offs_d, qk_scale, RANGE_MASK, False, INT64_OFFSETS)
        # diagonal of text key tiles: queries [k0, k1) with q >= k
        dk, dv = _dkdv_range(dk, dv, k, v, Q, DO, LSE, DELTA, b64, hk64, sqb, sqh, sqn, sdob, sdoh, sdon, Hq, N,
                             d0, d1, offs_kn, offs_m, offs_d, qk_scale, G, BLOCK_M, True, INT64_OFFSETS)
        slot = tl.load(desc + D_SLOT)
        if slot >= 0:  # piece of a split key tile: fp32 partial sums into its workspace slot
            ws = ((slot.to(tl.int64) * Hkv + hk64) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * HEAD_D \
                + offs_d[None, :]
            tl.store(WS_DK + ws, dk * sm_scale)
            tl.store(WS_DV + ws, dv)
        else:
            tl.store(dk_ptrs, (dk * sm_scale).to(dk_ptrs.dtype.element_ty), mask=kmask[:, None])
            tl.store(dv_ptrs, dv.to(dv_ptrs.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _split_reduce(WS_DK, WS_DV, DK, DV, RDESC, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, Hkv,
                  HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, INT64_OFFSETS: tl.constexpr):
    """dK/dV of split key tiles: sum the pieces' workspace slots in a fixed order."""
    pid = tl.program_id(0)
    r = pid // Hkv
    hk64 = (pid % Hkv).to(tl.int64)
    rp = RDESC + r * R_COLS
    b64 = tl.load(rp + 0).to(tl.int64)
    k0 = tl.load(rp + 1)
    k1 = tl.load(rp + 2)
    slot0 = tl.load(rp + 3)
    npieces = tl.load(rp + 4)
    offs = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    acc_k = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
    for j in range(0, npieces):
        ws = (((slot0 + j).to(tl.int64) * Hkv + hk64) * BLOCK_N + offs)[:, None] * HEAD_D + offs_d[None, :]
        acc_k += tl.load(WS_DK + ws)
        acc_v += tl.load(WS_DV + ws)
    rows = k0 + offs
    m = (rows < k1)[:, None]
    dk_ptrs = _rows(DK + b64 * sdkb + hk64 * sdkh, rows, sdkn, offs_d, INT64_OFFSETS)
    dv_ptrs = _rows(DV + b64 * sdvb + hk64 * sdvh, rows, sdvn, offs_d, INT64_OFFSETS)
    tl.store(dk_ptrs, acc_k.to(dk_ptrs.dtype.element_ty), mask=m)
    tl.store(dv_ptrs, acc_v.to(dv_ptrs.dtype.element_ty), mask=m)


# ============================================================================================== host wrappers
def _prep(x: torch.Tensor, n: int) -> torch.Tensor:
    """The tensor as it comes (any strides) unless its head dim is strided; long sequences need no copy either (the
    kernels switch to int64 row offsets, ``_int64``)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x


def _int64(n: int, *xs: torch.Tensor) -> bool:
    """INT64_OFFSETS: some row stride x N reaches INT64_OFFSETS_FROM (int32 row offsets would overflow)."""
    return max(x.stride(2) for x in xs) * n >= INT64_OFFSETS_FROM


def _like(x: torch.Tensor, poison: bool = False) -> torch.Tensor:
    """Uninitialised tensor of x's shape in x's memory layout (a [B, N, H, D] tensor seen as [B, H, N, D] gets the
    same strides; empty_like falls back to contiguous for non-dense views). NaN-filled when ``poison``."""
    y = torch.empty_like(x, memory_format=torch.preserve_format)
    if poison:
        y.fill_(float("nan"))
    return y


def _n_sm(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _plans(layout, b, n, hkv, cfg, device):
    """(plan with query tiles of fwd_block_m, plan with query tiles of dq_block_m); key tiles of dkdv_block_n."""
    n_sm = _n_sm(device)
    pf = build_plan(layout, b, n, cfg.fwd_block_m, cfg.dkdv_block_n, device, cfg.dkdv_split_chunk, hkv, n_sm)
    pq = pf if cfg.dq_block_m == cfg.fwd_block_m else build_plan(layout, b, n, cfg.dq_block_m, cfg.dkdv_block_n,
                                                                 device, cfg.dkdv_split_chunk, hkv, n_sm)
    return pf, pq


def _q_masks(plan: Plan, block: int) -> dict:
    """RANGE_MASK for the flat loop and SPLIT_PRE (prefix slots in their own, masked loop)."""
    if plan.q_align % block != 0 and plan.q_align_hier % block == 0:
        return {"RANGE_MASK": False, "SPLIT_PRE": True}
    return {"RANGE_MASK": plan.q_align % block != 0, "SPLIT_PRE": False}


def _k_masks(plan: Plan, block: int) -> dict:
    """RANGE_MASK for the dK/dV flat loop and SPLIT_X (later-token range in its own, masked loop)."""
    if plan.k_align % block != 0 and plan.k_align_hier % block == 0:
        return {"RANGE_MASK": False, "SPLIT_X": True}
    return {"RANGE_MASK": plan.k_align % block != 0, "SPLIT_X": False}


def _with_fallback(kernel: str, cfg: HierAttnConfig, chosen, launch) -> HierAttnConfig:
    """``launch(cfg)``; when ``cfg`` is the automatic choice (``chosen`` = (dtype, head dim, device), else None) and
    Triton reports ``kernel`` out of resources anyway (the shared-memory estimate is a model), shrink that kernel
    one step and retry, and remember the result for the device. Returns the config that ran."""
    while True:
        try:
            launch(cfg)
            return cfg
        except OutOfResources:
            smaller = shrink(cfg, kernel) if chosen is not None else None
            if smaller is None:
                raise
            cfg = smaller
            remember_config(*chosen, cfg)


def hier_attention_fwd(q, k, v, layout, scale, cfg: HierAttnConfig, poison: bool = False, chosen=None, out=None):
    """O [B, Hq, N, D] and LSE [B, Hq, N] (float32, base 2); returns (o, lse, config that ran). O goes into ``out``
    when given (it may be q: each program reads its query tile before it writes the same rows of O)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    if out is not None:
        o = out if out.stride(-1) == 1 else out.contiguous()
    elif q.stride(1) == d and q.stride(2) == hq * d:
        # q comes in the decoder's [B, N, Hq, D] layout: write O in it too, so that the decoder's
        # transpose(1, 2).contiguous() before o_proj is free (one [tokens x hidden] copy less per layer).
        o = torch.empty((b, n, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    else:
        o = torch.empty((b, hq, n, d), dtype=q.dtype, device=q.device)
    if poison and out is None:  # an out= that is q must keep q's values until each tile has read them
        o.fill_(float("nan"))
    lse = torch.empty((b, hq, n), dtype=torch.float32, device=q.device)

    def launch(c):
        plan, _ = _plans(layout, b, n, hkv, c, q.device)
        if plan.n_qtiles == 0:
            return
        _attn_fwd[(plan.n_qtiles * hq,)](
            q, k, v, o, lse, plan.qdesc, plan.vid_l0_end, plan.vid_end,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            hq, n, scale * LOG2E,
            G=hq // hkv, HEAD_D=d, BLOCK_M=c.fwd_block_m, BLOCK_N=c.fwd_block_n,
            **_q_masks(plan, c.fwd_block_n), FLAT=plan.q_flat, INT64_OFFSETS=_int64(n, q, k, v, o),
            num_warps=c.fwd_warps, num_stages=c.fwd_stages)

    cfg = _with_fallback("fwd", cfg, chosen, launch)
    if out is not None and o is not out:
        out.copy_(o)
        o = out
    return o, lse, cfg


def launch_dq(q, k, v, o, lse, do, delta, dq, layout, scale, cfg: HierAttnConfig, chosen=None) -> HierAttnConfig:
    """dQ kernel (also writes delta = rowsum(dO * O), needed by the dK/dV kernel)."""
    b, hq, n, d = q.shape

    def launch(c):
        _, pq = _plans(layout, b, n, k.shape[1], c, q.device)
        if pq.n_qtiles == 0:
            return
        _attn_bwd_dq[(pq.n_qtiles * hq,)](
            q, k, v, o, lse, do, delta, dq, pq.qdesc, pq.vid_l0_end, pq.vid_end,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
            hq, n, scale * LOG2E, scale,
            G=hq // k.shape[1], HEAD_D=d, BLOCK_M=c.dq_block_m, BLOCK_N=c.dq_block_n,
            **_q_masks(pq, c.dq_block_n), FLAT=pq.q_flat, INT64_OFFSETS=_int64(n, q, k, v, o, do, dq),
            num_warps=c.dq_warps, num_stages=c.dq_stages)

    return _with_fallback("dq", cfg, chosen, launch)


def launch_dkdv(q, k, v, do, lse, delta, dk, dv, layout, scale, cfg: HierAttnConfig, chosen=None) -> HierAttnConfig:
    """dK/dV kernel (and the reduction of split key tiles)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]

    def launch(c):
        pk, _ = _plans(layout, b, n, hkv, c, q.device)
        ws_k = ws_v = dk  # dummies when nothing is split
        if pk.n_slots:
            ws_k = torch.empty((pk.n_slots, hkv, c.dkdv_block_n, d), dtype=torch.float32, device=q.device)
            ws_v = torch.empty_like(ws_k)
        if pk.n_ktiles:
            _attn_bwd_dkdv[(pk.n_ktiles * hkv,)](
                q, k, v, do, lse, delta, dk, dv, pk.kdesc, ws_k, ws_v,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
                hq, hkv, n, scale * LOG2E, scale,
                G=hq // hkv, HEAD_D=d, BLOCK_M=c.dkdv_block_m, BLOCK_N=c.dkdv_block_n,
                **_k_masks(pk, c.dkdv_block_m), INT64_OFFSETS=_int64(n, q, k, v, do, dk, dv),
                num_warps=c.dkdv_warps, num_stages=c.dkdv_stages)
        if pk.n_slots:
            _split_reduce[(pk.rdesc.shape[0] * hkv,)](
                ws_k, ws_v, dk, dv, pk.rdesc, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0),
                dv.stride(1), dv.stride(2), hkv, HEAD_D=d, BLOCK_N=c.dkdv_block_n,
                INT64_OFFSETS=_int64(n, dk, dv), num_warps=4)

    return _with_fallback("dkdv", cfg, chosen, launch)


def hier_attention_bwd(do, q, k, v, o, lse, layout, scale, cfg: HierAttnConfig, poison: bool = False, chosen=None):
    n = q.shape[2]
    do = _prep(do, n)
    # gradients in their inputs' layouts: the decoder's [B, N, H, D] views get [B, N, H, D] gradients (no copy when
    # autograd hands them back through the transpose)
    dq, dk, dv = _like(q, poison=poison), _like(k, poison=poison), _like(v, poison=poison)
    delta = torch.empty_like(lse)
    cfg = launch_dq(q, k, v, o, lse, do, delta, dq, layout, scale, cfg, chosen)
    launch_dkdv(q, k, v, do, lse, delta, dk, dv, layout, scale, cfg, chosen)
    return dq, dk, dv


class _HierAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, cfg, poison, chosen):
        o, lse, cfg = hier_attention_fwd(q, k, v, layout, scale, cfg, poison, chosen)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale, ctx.cfg, ctx.poison, ctx.chosen = layout, scale, cfg, poison, chosen
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = hier_attention_bwd(do, q, k, v, o, lse, ctx.layout, ctx.scale, ctx.cfg, ctx.poison,
                                        ctx.chosen)
        return dq, dk, dv, None, None, None, None, None


def hier_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: HierLayout, *,
                          scale: float | None = None, config: HierAttnConfig | None = None,
                          poison: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton hierarchical attention with autograd. ``config``: None picks ``choose_config(dtype, D, device)``
    (fitted to the device's shared memory, shrunk further at launch if Triton still runs out of resources); an
    explicit config runs as given. ``poison`` fills outputs and gradients with NaN before the kernels run (tests:
    every element must be written). ``out``: inference only, the output is written there (may be q itself)."""
    b, hq, hkv, n, d = check_inputs(q, k, v, layout)
    if d not in (16, 32, 64, 128):
        raise ValueError(f"the Triton kernel supports head dims 16, 32, 64, 128; got {d}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k, v must have the same dtype")
    if scale is None:
        scale = d ** -0.5
    chosen = None
    if config is None:
        chosen = (q.dtype, d, q.device)
        config = choose_config(*chosen)
    q, k, v = _prep(q, n), _prep(k, n), _prep(v, n)
    if out is not None:
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, out)):
            raise ValueError("out= is for inference: the output written in place has no gradient")
        return hier_attention_fwd(q, k, v, layout, float(scale), config, poison, chosen, out=out)[0]
    return _HierAttnFn.apply(q, k, v, layout, float(scale), config, poison, chosen)
