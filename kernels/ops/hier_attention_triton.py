"""Triton forward and backward kernels of hierarchical attention (docs/hierarchical_attention.md).

Tile schedule (built on the host from the layout's few integers, cached on the layout, copied once to the device):

* Query tiles never straddle a frame, a text run or a sequence: a tile is ``BLOCK_M`` (or fewer) consecutive
  tokens of one frame, or of one text run, or of one padding run. Each tile carries its key ranges:
  - the *plain prefix*: every non-aggregated token of its sequence before ``limit`` (``limit`` = the tile start for
    text, the video start for video tiles). In memory this is ``1 + #earlier videos`` contiguous segments
    ``[s0, v1.l0_end), [v1.end, v2.l0_end), ..., [vk.end, limit)`` read from two small per-video tables;
  - the *diagonal* (text tiles): keys ``[q0, q1)`` with the causal mask;
  - the *hierarchy* (video tiles): the same-level window W, the parent frame P and the children frames C, three
    contiguous ranges walked by one flat loop.
* Key tiles (dK/dV) are the same kind of tiles. The rule is symmetric inside a video, so a key frame is seen by the
  query frames of the same W/P/C ranges; a text key is seen by every token after it in its sequence (causal on
  the diagonal), a level-0 key of video V by every token after V's extended span.

Loops: when every query tile has at most ``PRE_SLOTS`` prefix segments (always, with at most two videos per
sequence) the query-side kernels walk prefix segments, W, P and C in ONE flat loop whose block addresses are pure
functions of the loop index (pipelined by Triton); otherwise a general nested loop walks any number of segments.
Masks are compile-time variants chosen from the power-of-two alignment of all range lengths (aligned layouts run
unmasked).

Load balance: the work list is sorted by decreasing cost (longest first), and dK/dV key tiles whose later-token
range is very long (text keys early in a long sequence) are split into pieces that write fp32 partial sums to a
workspace, summed in a fixed order by a small reduction kernel (deterministic, no atomics).

No mask or block table of size N^2 exists anywhere; counts are runtime integers (no recompilation per layout).
Padding tiles write zeros (output, dQ, dK, dV).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ..layout import HierLayout
from ..reference import check_inputs

__all__ = ["hier_attention_triton", "HierAttnConfig", "build_plan"]

LOG2E = 1.4426950408889634
DESC_COLS = 24  # int32 columns per tile descriptor (the kernels read `t * 24`)
PRE_SLOTS = 3  # prefix segments handled by the flat query-side loop (more -> general nested-loop path)
KIND_TEXT, KIND_VIDEO, KIND_PAD = 0, 1, 2


# ============================================================================================== host-side plan
def _tiles_for_range(t0, t1, bs):
    starts = np.arange(t0, t1, bs, dtype=np.int64)
    return starts, np.minimum(starts + bs, t1)


def _build_tiles(layout: HierLayout, batch: int, seq_len: int, bs: int, side: str):
    """Descriptors [DESC_COLS, T] (int32 numpy, column-major: each field written contiguously) and costs [T] for
    query tiles (side='q') or key tiles (side='k'), in layout order (build_plan sorts them)."""
    m, e, a = layout.tokens_per_frame, layout.neighbours, layout.arity
    spans = layout.video_spans()
    seqs = layout.seq_list()
    order = sorted(range(len(spans)), key=lambda i: (spans[i].row, spans[i].start))
    rank = {vi: r for r, vi in enumerate(order)}
    blocks, costs = [], []

    def text_tiles(row, t0, t1, s0, s1, vid_lo, nprev, plain_before, prefix_segs):
        if t1 <= t0:
            return
        st, en = _tiles_for_range(t0, t1, bs)
        d = np.zeros((DESC_COLS, st.size), dtype=np.int32)
        d[0] = KIND_TEXT
        d[1] = row
        d[2] = st
        d[3] = en
        if side == "q":
            d[4] = s0
            d[5] = vid_lo
            d[6] = nprev
            d[7] = st  # plain prefix ends at the tile start
            d[14] = st  # diagonal
            d[15] = en
            segs = [sg for sg in prefix_segs if sg[1] > sg[0]]
            for r, (a0, a1) in enumerate(segs[:PRE_SLOTS]):
                d[16 + 2 * r] = a0
                d[17 + 2 * r] = a1
            r = len(segs)
            last = st > t0  # the text run's own earlier tokens: [t0, q0)
            if r < PRE_SLOTS:
                d[16 + 2 * r] = np.where(last, t0, 0)
                d[17 + 2 * r] = np.where(last, st, 0)
            d[22] = r + last.astype(np.int64)  # number of prefix segments
            cost = plain_before + (st - t0) + (en - st)
        else:
            d[4] = en  # queries after the tile: [k1, s1)
            d[5] = s1
            d[14] = st  # diagonal (queries [k0, k1), causal)
            d[15] = en
            cost = (s1 - en) + (en - st)
        blocks.append(d)
        costs.append(np.asarray(cost, dtype=np.int64) + np.zeros(st.size, dtype=np.int64))

    for j, (row, s0, s1) in enumerate(seqs):
        vids = sorted((sp for sp in spans if sp.seq == j), key=lambda s: s.start)
        vid_lo = rank[vids[0].index] if vids else 0
        cursor, plain_before = s0, 0
        done_segs: list[tuple[int, int]] = []  # plain segments before `cursor`
        for nprev, sp in enumerate(vids):
            text_tiles(row, cursor, sp.start, s0, s1, vid_lo, nprev, plain_before, done_segs)
            plain_before += sp.start - cursor
            vid_prefix = done_segs + [(cursor, sp.start)]
            # every tile of every level of this video at once: frame n of level l, sub-tile ss of the frame
            counts = np.asarray(sp.counts, dtype=np.int64)
            lstarts = np.asarray(sp.level_starts, dtype=np.int64)
            nlev = counts.size
            sub = np.arange(0, m, bs, dtype=np.int64)
            lvl = np.repeat(np.repeat(np.arange(nlev), counts), sub.size)
            first = np.repeat(np.cumsum(counts) - counts, counts)  # index of each level's first frame
            nn = np.repeat(np.arange(int(counts.sum()), dtype=np.int64) - first, sub.size)
            c, ls = counts[lvl], lstarts[lvl]
            f0 = ls + nn * m
            st = f0 + np.tile(sub, nn.size // sub.size)
            en = np.minimum(st + bs, f0 + m)
            d = np.zeros((DESC_COLS, st.size), dtype=np.int32)
            d[0] = KIND_VIDEO
            d[1] = row
            d[2] = st
            d[3] = en
            d[8] = ls + m * np.maximum(nn - e, 0)
            d[9] = ls + m * (np.minimum(nn + e, c - 1) + 1)
            up = lvl + 1 < nlev  # parent frame on the next level
            nxt = np.minimum(lvl + 1, nlev - 1)
            d[10] = np.where(up, lstarts[nxt] + m * (nn // a), 0)
            d[11] = np.where(up, d[10] + m, 0)
            down = lvl >= 1  # children frames on the previous level
            prv = np.maximum(lvl - 1, 0)
            d[12] = np.where(down, lstarts[prv] + m * nn * a, 0)
            d[13] = np.where(down, lstarts[prv] + m * np.minimum(nn * a + a, counts[prv]), 0)
            hier = (d[9] - d[8]) + (d[11] - d[10]) + (d[13] - d[12])
            if side == "q":
                d[4] = s0
                d[5] = vid_lo
                d[6] = nprev
                d[7] = sp.start
                segs = [sg for sg in vid_prefix if sg[1] > sg[0]]
                for r, (a0, a1) in enumerate(segs[:PRE_SLOTS]):
                    d[16 + 2 * r] = a0
                    d[17 + 2 * r] = a1
                d[22] = len(segs)
                cost = hier + plain_before
            else:
                level0 = lvl == 0  # level-0 keys are also read by the tokens after the video
                d[4] = np.where(level0, sp.end, 0)
                d[5] = np.where(level0, s1, 0)
                cost = hier + (d[5] - d[4])
            blocks.append(d)
            costs.append(cost)
            plain_before += sp.frames * m
            done_segs = done_segs + [(cursor, sp.l0_end)]
            cursor = sp.end
        text_tiles(row, cursor, s1, s0, s1, vid_lo, len(vids), plain_before, done_segs)

    # padding: complement of the sequences in every row
    by_row: dict[int, list[tuple[int, int]]] = {}
    for row, s0, s1 in seqs:
        by_row.setdefault(row, []).append((s0, s1))
    for row in range(batch):
        pos = 0
        for s0, s1 in sorted(by_row.get(row, [])) + [(seq_len, seq_len)]:
            if s0 > pos:
                st, en = _tiles_for_range(pos, s0, bs)
                d = np.zeros((DESC_COLS, st.size), dtype=np.int32)
                d[0] = KIND_PAD
                d[1] = row
                d[2] = st
                d[3] = en
                blocks.append(d)
                costs.append(np.zeros(st.size, dtype=np.int64))
            pos = max(pos, s1)
    if not blocks:
        return np.zeros((DESC_COLS, 0), dtype=np.int32), np.zeros(0, dtype=np.int64), order
    return np.concatenate(blocks, axis=1), np.concatenate(costs), order


@dataclass
class Plan:
    qdesc: torch.Tensor  # [Tq, DESC_COLS] int32, query tiles of size block_q
    kdesc: torch.Tensor  # [Tk, DESC_COLS] int32, key tiles of size block_k
    vid_l0_end: torch.Tensor  # [V] int32, sorted by (row, start)
    vid_end: torch.Tensor  # [V] int32
    n_qtiles: int
    n_ktiles: int
    q_flat: bool  # every query tile has <= PRE_SLOTS prefix segments: flat loop
    q_align: int  # power-of-two alignment of every key range of the flat query-side loop (prefix slots, W, P, C)
    q_align_hier: int  # of the W, P, C ranges only
    k_align: int  # power-of-two alignment of every query range of the flat dK/dV loop (later tokens X, W, P, C)
    k_align_hier: int  # of the W, P, C ranges only
    rdesc: torch.Tensor | None = None  # [R, 8] int32: split key tiles (b, k0, k1, first slot, pieces)
    n_slots: int = 0  # workspace slots (pieces of split key tiles)
    split_chunk: int = 0


def _split_heavy_key_tiles(kd: np.ndarray, kcost: np.ndarray, chunk: int):
    """Split the 'later tokens' query range X of key tiles (kd: [DESC_COLS, T]) longer than ``chunk`` into pieces
    (load balance: a text key early in a long sequence is seen by every later token). Pieces write fp32 partial
    dK/dV into workspace slots that a reduction kernel sums in a fixed order (deterministic)."""
    kd[23] = -1
    heavy = np.nonzero((kd[5] - kd[4] > chunk) & (kd[0] != KIND_PAD))[0] if chunk > 0 else []
    if len(heavy) == 0:
        return kd, kcost, np.zeros((0, 8), dtype=np.int64), 0
    extra, extra_cost, red = [], [], []
    slot = 0
    for t in heavy.tolist():
        x0, x1 = int(kd[4, t]), int(kd[5, t])
        npieces = -(-(x1 - x0) // chunk)
        red.append((kd[1, t], kd[2, t], kd[3, t], slot, npieces, 0, 0, 0))
        starts = x0 + chunk * np.arange(npieces, dtype=np.int64)
        ends = np.minimum(starts + chunk, x1)
        pieces = np.repeat(kd[:, t:t + 1], npieces - 1, axis=1)  # pieces 1.. : no hierarchy ranges, no diagonal
        pieces[8:16] = 0
        pieces[4], pieces[5], pieces[23] = starts[1:], ends[1:], slot + np.arange(1, npieces)
        extra.append(pieces)
        extra_cost.append(ends[1:] - starts[1:])
        kcost[t] -= (x1 - x0) - (ends[0] - starts[0])  # piece 0 stays in place
        kd[5, t], kd[23, t] = ends[0], slot
        slot += npieces
    kd = np.concatenate([kd] + extra, axis=1)
    kcost = np.concatenate([kcost] + extra_cost)
    return kd, kcost, np.asarray(red, dtype=np.int64), slot


def _alignment(desc: np.ndarray, cols) -> int:
    """Largest power of two (at most 2**30) dividing the length of every range [desc[c], desc[c + 1]) over all tiles
    (desc: [DESC_COLS, T]). Blocks are powers of two, so a block needs no range mask iff it divides this."""
    bits = 1 << 30
    for c0 in cols:
        bits |= int(np.bitwise_or.reduce(desc[c0 + 1] - desc[c0], initial=0))
    return bits & -bits


def build_plan(layout: HierLayout, batch: int, seq_len: int, block_q: int, block_k: int, device,
               split_chunk: int = 0, kv_heads: int = 1, n_sm: int = 132) -> Plan:
    """Tile schedule for the forward/dQ (query tiles of ``block_q``) and dK/dV (key tiles of ``block_k``).

    ``split_chunk``: split the later-token query range of dK/dV key tiles into pieces of at most this many
    tokens; 0 = automatic (a quarter of the average work per multiprocessor, at least 4096), -1 = never."""
    key = ("plan", batch, seq_len, block_q, block_k, str(device), split_chunk, kv_heads, n_sm)
    hit = layout._cache.get(key)
    if hit is not None:
        return hit
    layout.validate(batch, seq_len)
    if max(seq_len, 1) >= 2**31 - 1:
        raise ValueError("sequence too long for int32 tile descriptors")
    qd, qcost, order = _build_tiles(layout, batch, seq_len, block_q, "q")
    kd, kcost, _ = _build_tiles(layout, batch, seq_len, block_k, "k")
    if split_chunk == 0:
        per_sm = int(kcost.sum()) * kv_heads // max(1, n_sm)
        split_chunk = max(4096, per_sm // 4)
    if split_chunk > 0:
        split_chunk = -(-split_chunk // 128) * 128  # multiple of every query block size
    kd, kcost, red, n_slots = _split_heavy_key_tiles(kd, kcost, split_chunk)
    spans = layout.video_spans()
    l0 = np.array([spans[i].l0_end for i in order] or [0], dtype=np.int32)
    ve = np.array([spans[i].end for i in order] or [0], dtype=np.int32)
    q_flat = bool(qd.shape[1] == 0 or int(qd[22].max()) <= PRE_SLOTS)
    q_align_hier = _alignment(qd, [8, 10, 12])
    q_align = min(q_align_hier, _alignment(qd, [16, 18, 20]))
    k_align_hier = _alignment(kd, [8, 10, 12])
    k_align = min(k_align_hier, _alignment(kd, [4]))
    # one int32 buffer, one host-to-device copy; tiles sorted by decreasing cost (longest first: load balance)
    sizes = [qd.size, kd.size, l0.size, ve.size, red.size]
    flat = np.empty(sum(sizes), dtype=np.int32)
    parts_np = np.split(flat, np.cumsum(sizes)[:-1])
    for dst, desc, cost in ((parts_np[0], qd, qcost), (parts_np[1], kd, kcost)):
        perm = np.argsort(-cost, kind="stable")
        dst.reshape(-1, DESC_COLS)[:] = desc.T[perm]
    parts_np[2][:], parts_np[3][:], parts_np[4][:] = l0, ve, red.reshape(-1)
    parts = torch.split(torch.from_numpy(flat).to(device), sizes)
    plan = Plan(parts[0].view(-1, DESC_COLS), parts[1].view(-1, DESC_COLS), parts[2], parts[3], qd.shape[1],
                kd.shape[1], q_flat, q_align, q_align_hier, k_align, k_align_hier, parts[4].view(-1, 8), n_slots,
                split_chunk)
    layout._cache[key] = plan
    return plan


# ============================================================================================== kernels
@triton.jit
def _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, kstart, kend, offs_m, offs_n, offs_d, qk_scale,
               MASK_END: tl.constexpr, CAUSAL: tl.constexpr):
    offs_k = kstart + offs_n
    if MASK_END:
        kmask = offs_k < kend
        k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :], mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :])
        v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :])
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
def _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, kstart, kend, offs_m, offs_n, offs_d, qk_scale,
              MASK_END: tl.constexpr, CAUSAL: tl.constexpr, EARLY_DP: tl.constexpr):
    offs_k = kstart + offs_n
    if MASK_END:
        kmask = offs_k < kend
        k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :], mask=kmask[:, None], other=0.0)
        v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :], mask=kmask[:, None], other=0.0)
    else:
        k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :])
        v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :])
    qk = tl.dot(q, tl.trans(k)) * qk_scale
    if EARLY_DP:
        # issue dO V^T before the exponentials so that the tensor cores run it while the exps are computed
        dp = tl.dot(do, tl.trans(v))
    p = tl.math.exp2(qk - lse[:, None])
    if MASK_END:
        p = tl.where(offs_k[None, :] < kend, p, 0.0)
    if CAUSAL:
        p = tl.where(offs_k[None, :] <= offs_m[:, None], p, 0.0)
    if not EARLY_DP:
        dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _q_side_kernel(Q, K, V, O, LSE, DO, DELTA, DQ, QDESC, VID_L0END, VID_END,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                   sdob, sdoh, sdon, sdqb, sdqh, sdqn,
                   Hq, N, qk_scale, sm_scale,
                   G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   RANGE_MASK: tl.constexpr, FLAT: tl.constexpr, MODE: tl.constexpr, SPLIT_PRE: tl.constexpr,
                   EARLY_DP: tl.constexpr):
    """MODE 0: forward (O, LSE). MODE 1: dQ (and DELTA = rowsum(dO * O)).

    FLAT: one loop over the blocks of six key ranges (<= 3 prefix segments, W, P, C) read from the descriptor;
    otherwise the general path walks any number of prefix segments (nested loop). RANGE_MASK: some range length
    is not a multiple of BLOCK_N (mask the key end)."""
    pid = tl.program_id(0)
    t = pid // Hq
    h = pid % Hq
    hk = h // G
    dp_ = QDESC + t * 24
    kind = tl.load(dp_ + 0)
    b = tl.load(dp_ + 1)
    q0 = tl.load(dp_ + 2)
    q1 = tl.load(dp_ + 3)
    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_D)
    qmask = offs_m < q1
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    row_stat = (b64 * Hq + h64) * N  # LSE / DELTA are [B, Hq, N] float32
    if MODE == 0:
        o_ptrs = O + b64 * sob + h64 * soh + offs_m[:, None] * son + offs_d[None, :]
    else:
        o_ptrs = DQ + b64 * sdqb + h64 * sdqh + offs_m[:, None] * sdqn + offs_d[None, :]
    if kind == 2:
        tl.store(o_ptrs, tl.zeros([BLOCK_M, HEAD_D], dtype=o_ptrs.dtype.element_ty), mask=qmask[:, None])
    else:
        w0 = tl.load(dp_ + 8)
        w1 = tl.load(dp_ + 9)
        p0 = tl.load(dp_ + 10)
        p1 = tl.load(dp_ + 11)
        c0 = tl.load(dp_ + 12)
        c1 = tl.load(dp_ + 13)
        d0 = tl.load(dp_ + 14)
        d1 = tl.load(dp_ + 15)
        q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=qmask[:, None],
                    other=0.0)
        k_base = K + b64 * skb + hk64 * skh
        v_base = V + b64 * svb + hk64 * svh
        if MODE == 0:
            acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        else:
            do = tl.load(DO + b64 * sdob + h64 * sdoh + offs_m[:, None] * sdon + offs_d[None, :],
                         mask=qmask[:, None], other=0.0)
            o = tl.load(O + b64 * sob + h64 * soh + offs_m[:, None] * son + offs_d[None, :], mask=qmask[:, None],
                        other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            tl.store(DELTA + row_stat + offs_m, delta, mask=qmask)
            lse = tl.load(LSE + row_stat + offs_m, mask=qmask, other=0.0)
            dq = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)

        if FLAT:
            # ---- one flat loop over prefix segments a, b, c and the hierarchy ranges W, P, C
            a0 = tl.load(dp_ + 16)
            a1 = tl.load(dp_ + 17)
            e0 = tl.load(dp_ + 18)
            e1 = tl.load(dp_ + 19)
            f0 = tl.load(dp_ + 20)
            f1 = tl.load(dp_ + 21)
            n1 = tl.cdiv(a1 - a0, BLOCK_N)
            n2 = n1 + tl.cdiv(e1 - e0, BLOCK_N)
            n3 = n2 + tl.cdiv(f1 - f0, BLOCK_N)
            n4 = n3 + tl.cdiv(w1 - w0, BLOCK_N)
            n5 = n4 + tl.cdiv(p1 - p0, BLOCK_N)
            n6 = n5 + tl.cdiv(c1 - c0, BLOCK_N)
            if SPLIT_PRE:
                # misaligned prefix (text lengths) but aligned hierarchy: mask only the prefix loop
                for i in range(0, n3):
                    base = tl.where(i < n1, a0, tl.where(i < n2, e0 - n1 * BLOCK_N, f0 - n2 * BLOCK_N))
                    ks = base + i * BLOCK_N
                    kend = tl.where(i < n1, a1, tl.where(i < n2, e1, f1))
                    if MODE == 0:
                        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, ks, kend, offs_m,
                                                   offs_n, offs_d, qk_scale, True, False)
                    else:
                        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, ks, kend, offs_m, offs_n,
                                       offs_d, qk_scale, True, False, EARLY_DP)
                n_lo = n3
            else:
                n_lo = 0
            for i in range(n_lo, n6):
                base = tl.where(i < n1, a0, tl.where(i < n2, e0 - n1 * BLOCK_N, tl.where(
                    i < n3, f0 - n2 * BLOCK_N, tl.where(i < n4, w0 - n3 * BLOCK_N, tl.where(
                        i < n5, p0 - n4 * BLOCK_N, c0 - n5 * BLOCK_N)))))
                ks = base + i * BLOCK_N
                kend = tl.where(i < n1, a1, tl.where(i < n2, e1, tl.where(i < n3, f1, tl.where(
                    i < n4, w1, tl.where(i < n5, p1, c1)))))
                if MODE == 0:
                    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, ks, kend, offs_m,
                                               offs_n, offs_d, qk_scale, RANGE_MASK, False)
                else:
                    dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, ks, kend, offs_m, offs_n,
                                   offs_d, qk_scale, RANGE_MASK, False, EARLY_DP)
        else:
            # ---- general phase 1: plain prefix segments [s0, l0_end(v1)), [end(v1), l0_end(v2)), ..., [., limit)
            s0 = tl.load(dp_ + 4)
            vid_lo = tl.load(dp_ + 5)
            nprev = tl.load(dp_ + 6)
            limit = tl.load(dp_ + 7)
            seg_start = s0
            for j in range(0, nprev + 1):
                has_vid = j < nprev
                seg_end = tl.load(VID_L0END + vid_lo + j, mask=has_vid, other=0)
                seg_end = tl.where(has_vid, seg_end, limit)
                nxt = tl.load(VID_END + vid_lo + j, mask=has_vid, other=0)
                nxt = tl.where(has_vid, nxt, limit)
                for ks in range(seg_start, seg_end, BLOCK_N):
                    if MODE == 0:
                        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, ks, seg_end, offs_m,
                                                   offs_n, offs_d, qk_scale, True, False)
                    else:
                        dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, ks, seg_end, offs_m,
                                       offs_n, offs_d, qk_scale, True, False, EARLY_DP)
                seg_start = nxt
            # ---- general phase 3: hierarchy W, P, C
            nw = tl.cdiv(w1 - w0, BLOCK_N)
            nwp = nw + tl.cdiv(p1 - p0, BLOCK_N)
            nc = tl.cdiv(c1 - c0, BLOCK_N)
            for i in range(0, nwp + nc):
                in_p = i >= nw
                in_c = i >= nwp
                base = tl.where(in_c, c0 - nwp * BLOCK_N, tl.where(in_p, p0 - nw * BLOCK_N, w0))
                kend = tl.where(in_c, c1, tl.where(in_p, p1, w1))
                ks = base + i * BLOCK_N
                if MODE == 0:
                    acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, ks, kend, offs_m,
                                               offs_n, offs_d, qk_scale, RANGE_MASK, False)
                else:
                    dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, ks, kend, offs_m, offs_n,
                                   offs_d, qk_scale, RANGE_MASK, False, EARLY_DP)

        # ---- diagonal of text tiles, causal (zero iterations for video tiles)
        for ks in range(d0, d1, BLOCK_N):
            if MODE == 0:
                acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, k_base, v_base, skn, svn, ks, d1, offs_m, offs_n,
                                           offs_d, qk_scale, True, True)
            else:
                dq = _dq_block(dq, q, do, lse, delta, k_base, v_base, skn, svn, ks, d1, offs_m, offs_n, offs_d,
                               qk_scale, True, True, EARLY_DP)

        if MODE == 0:
            out = acc / l_i[:, None]
            tl.store(o_ptrs, out.to(o_ptrs.dtype.element_ty), mask=qmask[:, None])
            tl.store(LSE + row_stat + offs_m, m_i + tl.math.log2(l_i), mask=qmask)
        else:
            tl.store(o_ptrs, (dq * sm_scale).to(o_ptrs.dtype.element_ty), mask=qmask[:, None])


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqn, sdon, qstart, qend, offs_kn, offs_m,
                offs_d, qk_scale, ROW_MASK: tl.constexpr, CAUSAL: tl.constexpr, KV_AS_B: tl.constexpr,
                EARLY_DP: tl.constexpr):
    offs_q = qstart + offs_m
    if ROW_MASK:
        qm = offs_q < qend
        q = tl.load(q_base + offs_q[:, None] * sqn + offs_d[None, :], mask=qm[:, None], other=0.0)
        do = tl.load(do_base + offs_q[:, None] * sdon + offs_d[None, :], mask=qm[:, None], other=0.0)
        lse = tl.load(lse_base + offs_q, mask=qm, other=float("inf"))
        delta = tl.load(delta_base + offs_q, mask=qm, other=0.0)
    else:
        q = tl.load(q_base + offs_q[:, None] * sqn + offs_d[None, :])
        do = tl.load(do_base + offs_q[:, None] * sdon + offs_d[None, :])
        lse = tl.load(lse_base + offs_q)
        delta = tl.load(delta_base + offs_q)
    if KV_AS_B:
        # k, v stay in shared memory as the B operands; p and ds are transposed in registers
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.math.exp2(qk - lse[:, None])
        if CAUSAL:
            p = tl.where(offs_q[:, None] >= offs_kn[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    else:
        qkT = tl.dot(k, tl.trans(q)) * qk_scale  # [BLOCK_N, BLOCK_M]
        if EARLY_DP:
            # issue V dO^T before the exponentials (tensor cores busy while the exps are computed)
            dpT = tl.dot(v, tl.trans(do))
        pT = tl.math.exp2(qkT - lse[None, :])
        if CAUSAL:
            pT = tl.where(offs_q[None, :] >= offs_kn[:, None], pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        if not EARLY_DP:
            dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit
def _dkdv_range(dk, dv, k, v, Q, DO, LSE, DELTA, b64, hk64, sqb, sqh, sqn, sdob, sdoh, sdon, Hq, N, r0, r1, offs_kn,
                offs_m, offs_d, qk_scale, G: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr,
                KV_AS_B: tl.constexpr, EARLY_DP: tl.constexpr):
    """The query blocks of one range [r0, r1) for each query head of the group, the range end masked."""
    nr = tl.cdiv(r1 - r0, BLOCK_M)
    for it in range(0, G * nr):
        g = it // nr
        i = it - g * nr
        h64 = hk64 * G + g
        row_stat = (b64 * Hq + h64) * N
        dk, dv = _dkdv_block(dk, dv, k, v, Q + b64 * sqb + h64 * sqh, DO + b64 * sdob + h64 * sdoh,
                             LSE + row_stat, DELTA + row_stat, sqn, sdon, r0 + i * BLOCK_M, r1,
                             offs_kn, offs_m, offs_d, qk_scale, True, CAUSAL, KV_AS_B, EARLY_DP)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KDESC, WS_DK, WS_DV,
                 sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon,
                 sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                 Hq, Hkv, N, qk_scale, sm_scale,
                 G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 RANGE_MASK: tl.constexpr, KV_AS_B: tl.constexpr, EARLY_DP: tl.constexpr, SPLIT_X: tl.constexpr):
    """dK, dV of one key tile and kv head: one flat loop over (query head of the group) x (query blocks of the
    ranges X (later tokens), W, P, C), then the causal diagonal of text key tiles. SPLIT_X: X in its own masked
    loop, before the flat loop over W, P, C (RANGE_MASK then refers to W, P, C only)."""
    pid = tl.program_id(0)
    t = pid // Hkv
    hk = pid % Hkv
    dp_ = KDESC + t * 24
    kind = tl.load(dp_ + 0)
    b = tl.load(dp_ + 1)
    k0 = tl.load(dp_ + 2)
    k1 = tl.load(dp_ + 3)
    offs_kn = k0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_D)
    kmask = offs_kn < k1
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    dk_ptrs = DK + b64 * sdkb + hk64 * sdkh + offs_kn[:, None] * sdkn + offs_d[None, :]
    dv_ptrs = DV + b64 * sdvb + hk64 * sdvh + offs_kn[:, None] * sdvn + offs_d[None, :]
    if kind == 2:
        tl.store(dk_ptrs, tl.zeros([BLOCK_N, HEAD_D], dtype=dk_ptrs.dtype.element_ty), mask=kmask[:, None])
        tl.store(dv_ptrs, tl.zeros([BLOCK_N, HEAD_D], dtype=dv_ptrs.dtype.element_ty), mask=kmask[:, None])
    else:
        x0 = tl.load(dp_ + 4)
        x1 = tl.load(dp_ + 5)
        w0 = tl.load(dp_ + 8)
        w1 = tl.load(dp_ + 9)
        p0 = tl.load(dp_ + 10)
        p1 = tl.load(dp_ + 11)
        c0 = tl.load(dp_ + 12)
        c1 = tl.load(dp_ + 13)
        d0 = tl.load(dp_ + 14)
        d1 = tl.load(dp_ + 15)
        k = tl.load(K + b64 * skb + hk64 * skh + offs_kn[:, None] * skn + offs_d[None, :], mask=kmask[:, None],
                    other=0.0)
        v = tl.load(V + b64 * svb + hk64 * svh + offs_kn[:, None] * svn + offs_d[None, :], mask=kmask[:, None],
                    other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_D], dtype=tl.float32)
        if SPLIT_X:
            # misaligned later-token range X (text lengths) but aligned hierarchy: mask only this loop
            dk, dv = _dkdv_range(dk, dv, k, v, Q, DO, LSE, DELTA, b64, hk64, sqb, sqh, sqn, sdob, sdoh, sdon, Hq, N,
                                 x0, x1, offs_kn, offs_m, offs_d, qk_scale, G, BLOCK_M, False, KV_AS_B, EARLY_DP)
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
                                 offs_kn, offs_m, offs_d, qk_scale, RANGE_MASK, False, KV_AS_B, EARLY_DP)
        # diagonal of text key tiles: queries [k0, k1) with q >= k
        dk, dv = _dkdv_range(dk, dv, k, v, Q, DO, LSE, DELTA, b64, hk64, sqb, sqh, sqn, sdob, sdoh, sdon, Hq, N,
                             d0, d1, offs_kn, offs_m, offs_d, qk_scale, G, BLOCK_M, True, KV_AS_B, EARLY_DP)
        slot = tl.load(dp_ + 23)
        if slot >= 0:  # piece of a split key tile: fp32 partial sums into its workspace slot
            ws = ((slot.to(tl.int64) * Hkv + hk64) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * HEAD_D \
                + offs_d[None, :]
            tl.store(WS_DK + ws, dk * sm_scale)
            tl.store(WS_DV + ws, dv)
        else:
            tl.store(dk_ptrs, (dk * sm_scale).to(dk_ptrs.dtype.element_ty), mask=kmask[:, None])
            tl.store(dv_ptrs, dv.to(dv_ptrs.dtype.element_ty), mask=kmask[:, None])


@triton.jit
def _split_reduce_kernel(WS_DK, WS_DV, DK, DV, RDESC, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, Hkv,
                         HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK/dV of split key tiles: sum the pieces' workspace slots in a fixed order."""
    pid = tl.program_id(0)
    r = pid // Hkv
    hk64 = (pid % Hkv).to(tl.int64)
    rp = RDESC + r * 8
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
    dk_ptrs = DK + b64 * sdkb + hk64 * sdkh + rows[:, None] * sdkn + offs_d[None, :]
    dv_ptrs = DV + b64 * sdvb + hk64 * sdvh + rows[:, None] * sdvn + offs_d[None, :]
    tl.store(dk_ptrs, acc_k.to(dk_ptrs.dtype.element_ty), mask=m)
    tl.store(dv_ptrs, acc_v.to(dv_ptrs.dtype.element_ty), mask=m)


# ============================================================================================== wrappers
@dataclass(frozen=True)
class HierAttnConfig:
    """Block sizes and launch parameters (defaults tuned for H100, D = 128, bf16)."""

    fwd_block_m: int = 128
    fwd_block_n: int = 64
    fwd_warps: int = 8
    fwd_stages: int = 3
    dq_block_m: int = 128
    dq_block_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 3
    # v4: 64 keys x 64 queries, 4 warps, 2 stages: 99 KB of shared memory, so two CTAs share an SM and one's
    # exponentials overlap the other's matmuls (v3: 128 x 64, 8 warps, 3 stages, 165 KB, one CTA; NOTES.md)
    dkdv_block_n: int = 64
    dkdv_block_m: int = 64
    dkdv_warps: int = 4
    dkdv_stages: int = 2
    dkdv_kv_as_b: bool = False
    dkdv_split_chunk: int = 0  # 0: automatic; -1: never split heavy key tiles; > 0: split size in tokens
    allow_flat: bool = True  # False forces the general (nested-loop) query-side path (tests)
    # misaligned text lengths: the prefix (query side) and the later-token range (dK/dV) get their own masked
    # loops, so that the hierarchy loop stays unmasked
    split_prefix: bool = True
    dkdv_split_x: bool = True
    # backward: issue the dO V^T matmul before the exponentials (overlap MUFU work with the tensor cores)
    dq_early_dp: bool = False
    dkdv_early_dp: bool = False

    @staticmethod
    def for_interpreter() -> "HierAttnConfig":
        return HierAttnConfig(16, 16, 4, 1, 16, 16, 4, 1, 16, 16, 4, 1)


def default_config(head_dim: int) -> HierAttnConfig:
    """Measured best on H100 for D = 128 (NOTES.md); for D = 64 the same blocks compile with at most a few bytes
    of spill (Triton 3.6 ptxas report: dK/dV 8 B). ``SOPHIA_HIER_CONFIG`` overrides fields (A/B runs)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        cfg = HierAttnConfig.for_interpreter()
    else:
        cfg = HierAttnConfig()
    return _env_overrides(cfg)


def _env_overrides(cfg: HierAttnConfig) -> HierAttnConfig:
    """``SOPHIA_HIER_CONFIG="field=value,..."`` replaces HierAttnConfig fields (A/B of variants)."""
    return config_with(cfg, os.environ.get("SOPHIA_HIER_CONFIG", ""), source="SOPHIA_HIER_CONFIG")


def config_with(cfg: HierAttnConfig, fields: str, source: str = "config") -> HierAttnConfig:
    """``cfg`` with the fields of a "field=value,..." string replaced (e.g. ``dkdv_block_n=64,dkdv_warps=4``);
    ints, and 0/1/true/false/yes for booleans. An empty string changes nothing."""
    import dataclasses

    kw = {}
    for item in filter(None, (x.strip() for x in fields.split(","))):
        name, _, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if name not in HierAttnConfig.__dataclass_fields__:
            raise ValueError(f"{source}: unknown field {name!r}")
        kw[name] = raw.lower() in ("1", "true", "yes") if isinstance(getattr(cfg, name), bool) else int(raw)
    return dataclasses.replace(cfg, **kw)


def _prep(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.stride(-1) != 1 or x.stride(2) * n >= 2**31:
        x = x.contiguous()
    return x


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


def _q_masks(plan: "Plan", block: int, cfg) -> dict:
    """RANGE_MASK for the flat loop and SPLIT_PRE (prefix slots in their own, masked loop)."""
    hier_ok = plan.q_align_hier % block == 0
    if plan.q_align % block != 0 and hier_ok and cfg.split_prefix:
        return {"RANGE_MASK": False, "SPLIT_PRE": True}
    return {"RANGE_MASK": plan.q_align % block != 0, "SPLIT_PRE": False}


def _k_masks(plan: "Plan", block: int, cfg) -> dict:
    """RANGE_MASK for the dK/dV flat loop and SPLIT_X (later-token range in its own, masked loop)."""
    if plan.k_align % block != 0 and plan.k_align_hier % block == 0 and cfg.dkdv_split_x:
        return {"RANGE_MASK": False, "SPLIT_X": True}
    return {"RANGE_MASK": plan.k_align % block != 0, "SPLIT_X": False}


def hier_attention_fwd(q, k, v, layout, scale, cfg: HierAttnConfig, poison: bool = False):
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    plan, _ = _plans(layout, b, n, k.shape[1], cfg, q.device)
    o = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format) if poison else \
        torch.empty((b, hq, n, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, n), dtype=torch.float32, device=q.device)
    if plan.n_qtiles == 0:
        return o, lse
    grid = (plan.n_qtiles * hq,)
    _q_side_kernel[grid](
        q, k, v, o, lse, o, lse, o, plan.qdesc, plan.vid_l0_end, plan.vid_end,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
        0, 0, 0, 0, 0, 0,
        hq, n, scale * LOG2E, scale,
        G=hq // hkv, HEAD_D=d, BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n,
        **_q_masks(plan, cfg.fwd_block_n, cfg), FLAT=plan.q_flat and cfg.allow_flat, MODE=0, EARLY_DP=False,
        num_warps=cfg.fwd_warps,
        num_stages=cfg.fwd_stages)
    return o, lse


def launch_dq(q, k, v, o, lse, do, delta, dq, layout, scale, cfg: HierAttnConfig):
    """dQ kernel (also writes delta = rowsum(dO * O), needed by the dK/dV kernel)."""
    b, hq, n, d = q.shape
    _, pq = _plans(layout, b, n, k.shape[1], cfg, q.device)
    if pq.n_qtiles:
        _q_side_kernel[(pq.n_qtiles * hq,)](
            q, k, v, o, lse, do, delta, dq, pq.qdesc, pq.vid_l0_end, pq.vid_end,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            do.stride(0), do.stride(1), do.stride(2), dq.stride(0), dq.stride(1), dq.stride(2),
            hq, n, scale * LOG2E, scale,
            G=hq // k.shape[1], HEAD_D=d, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n,
            **_q_masks(pq, cfg.dq_block_n, cfg), FLAT=pq.q_flat and cfg.allow_flat, MODE=1,
            EARLY_DP=cfg.dq_early_dp,
            num_warps=cfg.dq_warps,
            num_stages=cfg.dq_stages)


def _key_plan(layout, b, n, hkv, cfg, device):
    return _plans(layout, b, n, hkv, cfg, device)[0]


def launch_dkdv(q, k, v, do, lse, delta, dk, dv, layout, scale, cfg: HierAttnConfig):
    """dK/dV kernel (and the reduction of split key tiles)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    pk = _key_plan(layout, b, n, hkv, cfg, q.device)
    ws_k = ws_v = dk  # dummies when nothing is split
    if pk.n_slots:
        ws_k = torch.empty((pk.n_slots, hkv, cfg.dkdv_block_n, d), dtype=torch.float32, device=q.device)
        ws_v = torch.empty_like(ws_k)
    if pk.n_ktiles:
        _dkdv_kernel[(pk.n_ktiles * hkv,)](
            q, k, v, do, lse, delta, dk, dv, pk.kdesc, ws_k, ws_v,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            hq, hkv, n, scale * LOG2E, scale,
            G=hq // hkv, HEAD_D=d, BLOCK_M=cfg.dkdv_block_m, BLOCK_N=cfg.dkdv_block_n,
            **_k_masks(pk, cfg.dkdv_block_m, cfg), KV_AS_B=cfg.dkdv_kv_as_b,
            EARLY_DP=cfg.dkdv_early_dp, num_warps=cfg.dkdv_warps,
            num_stages=cfg.dkdv_stages)
    if pk.n_slots:
        _split_reduce_kernel[(pk.rdesc.shape[0] * hkv,)](
            ws_k, ws_v, dk, dv, pk.rdesc, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1),
            dv.stride(2), hkv, HEAD_D=d, BLOCK_N=cfg.dkdv_block_n, num_warps=4)


def hier_attention_bwd(do, q, k, v, o, lse, layout, scale, cfg: HierAttnConfig, poison: bool = False):
    n = q.shape[2]
    do = _prep(do, n)

    def alloc(x):
        if poison:
            return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    delta = torch.empty_like(lse)
    launch_dq(q, k, v, o, lse, do, delta, dq, layout, scale, cfg)
    launch_dkdv(q, k, v, do, lse, delta, dk, dv, layout, scale, cfg)
    return dq, dk, dv


class _HierAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, scale, cfg, poison):
        o, lse = hier_attention_fwd(q, k, v, layout, scale, cfg, poison)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.scale, ctx.cfg, ctx.poison = layout, scale, cfg, poison
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = hier_attention_bwd(do, q, k, v, o, lse, ctx.layout, ctx.scale, ctx.cfg, ctx.poison)
        return dq, dk, dv, None, None, None, None


def hier_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: HierLayout, *,
                          scale: float | None = None, config: HierAttnConfig | None = None,
                          poison: bool = False) -> torch.Tensor:
    """Triton hierarchical attention with autograd. ``poison`` fills outputs and gradients with NaN before the
    kernels run (tests: every element must be written)."""
    b, hq, hkv, n, d = check_inputs(q, k, v, layout)
    if d not in (16, 32, 64, 128):
        raise ValueError(f"the Triton kernel supports head dims 16, 32, 64, 128; got {d}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError("q, k, v must have the same dtype")
    if scale is None:
        scale = d ** -0.5
    cfg = config or default_config(d)
    q, k, v = _prep(q, n), _prep(k, n), _prep(v, n)
    return _HierAttnFn.apply(q, k, v, layout, float(scale), cfg, poison)
