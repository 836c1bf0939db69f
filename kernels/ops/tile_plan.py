"""Tile plan of hierarchical attention: the per-tile descriptors the Triton kernels walk (host side, numpy).

Built from the layout's few integers, cached on the layout, copied once to the device.

* Query tiles never straddle a frame, a text run or a sequence: a tile is ``BLOCK_M`` (or fewer) consecutive
  tokens of one frame, or of one text run, or of one padding run. Each tile carries its key ranges:
  - the *plain prefix*: every non-aggregated token of its sequence before ``limit`` (``limit`` = the tile start for
    text, the video start for video tiles). In memory this is ``1 + #earlier videos`` contiguous segments
    ``[s0, v1.l0_end), [v1.end, v2.l0_end), ..., [vk.end, limit)``: the first ``PRE_SLOTS`` of them are written
    into the descriptor (flat loop), all of them can be rebuilt from two small per-video tables (general loop);
  - the *diagonal* (text tiles): keys ``[q0, q1)`` with the causal mask;
  - the *hierarchy* (video tiles): the same-level window W, the parent frame P and the children frames C.
* Key tiles (dK/dV) are the same kind of tiles. The rule is symmetric inside a video, so a key frame is seen by the
  query frames of the same W/P/C ranges; a text key is seen by every token after it in its sequence (causal on
  the diagonal), a level-0 key of video V by every token after V's extended span ("later tokens" X).

A descriptor is ``Col.COUNT`` int32 values; ``Col`` names the columns. Ranges are half-open ``[lo, hi)``; an
unused range is ``[0, 0)``. Tiles are sorted by decreasing cost (longest first: load balance), and key tiles whose
later-token range is very long are split into pieces (``_split_heavy_key_tiles``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..layout import HierLayout

__all__ = ["Col", "Plan", "build_plan", "PRE_SLOTS", "KIND_TEXT", "KIND_VIDEO", "KIND_PAD", "RDESC_COLS"]

PRE_SLOTS = 3  # prefix segments written into a query descriptor (more -> the general nested-loop path)
KIND_TEXT, KIND_VIDEO, KIND_PAD = 0, 1, 2
RDESC_COLS = 8  # int32 per split key tile: row, k0, k1, first workspace slot, pieces (3 unused)


class Col:
    """Column indices of a tile descriptor (query tiles and key tiles share the layout)."""

    KIND = 0  # KIND_TEXT, KIND_VIDEO or KIND_PAD
    ROW = 1  # batch row
    START = 2  # the tile's tokens [START, END)
    END = 3
    # query tiles, general path: the plain prefix is rebuilt from the per-video tables
    SEQ_START = 4  # first token of the sequence
    VID_LO = 5  # index (in the plan's video tables) of the sequence's first video
    NPREV = 6  # videos of the sequence before the tile
    LIMIT = 7  # the plain prefix ends here (tile start for text, video start for video tiles)
    # key tiles: "later tokens" X, the query range after the tile that sees it
    X0 = 4
    X1 = 5
    # hierarchy ranges (video tiles; [0, 0) otherwise)
    W0, W1 = 8, 9  # same-level window
    P0, P1 = 10, 11  # parent frame
    C0, C1 = 12, 13  # children frames
    DIAG0, DIAG1 = 14, 15  # causal diagonal (text tiles)
    PRE = 16  # query tiles: PRE_SLOTS prefix segments, (lo, hi) pairs at PRE + 2 r, PRE + 2 r + 1
    NPRE = 22  # query tiles: number of non-empty prefix segments (> PRE_SLOTS: general path)
    SLOT = 23  # key tiles: workspace slot of a split key tile's piece, -1 when not split
    COUNT = 24


# ============================================================================================== building tiles
def _tiles_for_range(t0, t1, bs):
    starts = np.arange(t0, t1, bs, dtype=np.int64)
    return starts, np.minimum(starts + bs, t1)


def _build_tiles(layout: HierLayout, batch: int, seq_len: int, bs: int, side: str):
    """Descriptors [Col.COUNT, T] (int32 numpy, column-major: each field written contiguously) and costs [T] for
    query tiles (side='q') or key tiles (side='k'), in layout order (build_plan sorts them)."""
    m, e, a = layout.tokens_per_frame, layout.neighbours, layout.arity
    spans = layout.video_spans()
    seqs = layout.seq_list()
    order = sorted(range(len(spans)), key=lambda i: (spans[i].row, spans[i].start))
    rank = {vi: r for r, vi in enumerate(order)}
    blocks, costs = [], []

    def new_desc(kind, row, st, en):
        d = np.zeros((Col.COUNT, st.size), dtype=np.int32)
        d[Col.KIND] = kind
        d[Col.ROW] = row
        d[Col.START] = st
        d[Col.END] = en
        return d

    def write_prefix(d, segs):
        for r, (a0, a1) in enumerate(segs[:PRE_SLOTS]):
            d[Col.PRE + 2 * r] = a0
            d[Col.PRE + 2 * r + 1] = a1

    def text_tiles(row, t0, t1, s0, s1, vid_lo, nprev, plain_before, prefix_segs):
        if t1 <= t0:
            return
        st, en = _tiles_for_range(t0, t1, bs)
        d = new_desc(KIND_TEXT, row, st, en)
        d[Col.DIAG0] = st  # diagonal: [q0, q1) (queries or keys), causal
        d[Col.DIAG1] = en
        if side == "q":
            d[Col.SEQ_START] = s0
            d[Col.VID_LO] = vid_lo
            d[Col.NPREV] = nprev
            d[Col.LIMIT] = st  # plain prefix ends at the tile start
            segs = [sg for sg in prefix_segs if sg[1] > sg[0]]
            write_prefix(d, segs)
            r = len(segs)
            last = st > t0  # the text run's own earlier tokens: [t0, q0)
            if r < PRE_SLOTS:
                d[Col.PRE + 2 * r] = np.where(last, t0, 0)
                d[Col.PRE + 2 * r + 1] = np.where(last, st, 0)
            d[Col.NPRE] = r + last.astype(np.int64)
            cost = plain_before + (st - t0) + (en - st)
        else:
            d[Col.X0] = en  # queries after the tile: [k1, s1)
            d[Col.X1] = s1
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
            d = new_desc(KIND_VIDEO, row, st, en)
            d[Col.W0] = ls + m * np.maximum(nn - e, 0)
            d[Col.W1] = ls + m * (np.minimum(nn + e, c - 1) + 1)
            up = lvl + 1 < nlev  # parent frame on the next level
            nxt = np.minimum(lvl + 1, nlev - 1)
            d[Col.P0] = np.where(up, lstarts[nxt] + m * (nn // a), 0)
            d[Col.P1] = np.where(up, d[Col.P0] + m, 0)
            down = lvl >= 1  # children frames on the previous level
            prv = np.maximum(lvl - 1, 0)
            d[Col.C0] = np.where(down, lstarts[prv] + m * nn * a, 0)
            d[Col.C1] = np.where(down, lstarts[prv] + m * np.minimum(nn * a + a, counts[prv]), 0)
            hier = (d[Col.W1] - d[Col.W0]) + (d[Col.P1] - d[Col.P0]) + (d[Col.C1] - d[Col.C0])
            if side == "q":
                d[Col.SEQ_START] = s0
                d[Col.VID_LO] = vid_lo
                d[Col.NPREV] = nprev
                d[Col.LIMIT] = sp.start
                segs = [sg for sg in vid_prefix if sg[1] > sg[0]]
                write_prefix(d, segs)
                d[Col.NPRE] = len(segs)
                cost = hier + plain_before
            else:
                level0 = lvl == 0  # level-0 keys are also read by the tokens after the video
                d[Col.X0] = np.where(level0, sp.end, 0)
                d[Col.X1] = np.where(level0, s1, 0)
                cost = hier + (d[Col.X1] - d[Col.X0])
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
                blocks.append(new_desc(KIND_PAD, row, st, en))
                costs.append(np.zeros(st.size, dtype=np.int64))
            pos = max(pos, s1)
    if not blocks:
        return np.zeros((Col.COUNT, 0), dtype=np.int32), np.zeros(0, dtype=np.int64), order
    return np.concatenate(blocks, axis=1), np.concatenate(costs), order


def _split_heavy_key_tiles(kd: np.ndarray, kcost: np.ndarray, chunk: int):
    """Split the later-token query range X of key tiles (kd: [Col.COUNT, T]) longer than ``chunk`` into pieces
    (load balance: a text key early in a long sequence is seen by every later token). Pieces write fp32 partial
    dK/dV into workspace slots that a reduction kernel sums in a fixed order (deterministic).

    Returns (descriptors, costs, reduction table [R, RDESC_COLS], number of slots)."""
    kd[Col.SLOT] = -1
    heavy = np.nonzero((kd[Col.X1] - kd[Col.X0] > chunk) & (kd[Col.KIND] != KIND_PAD))[0] if chunk > 0 else []
    if len(heavy) == 0:
        return kd, kcost, np.zeros((0, RDESC_COLS), dtype=np.int64), 0
    extra, extra_cost, red = [], [], []
    slot = 0
    for t in heavy.tolist():
        x0, x1 = int(kd[Col.X0, t]), int(kd[Col.X1, t])
        npieces = -(-(x1 - x0) // chunk)
        red.append((kd[Col.ROW, t], kd[Col.START, t], kd[Col.END, t], slot, npieces, 0, 0, 0))
        starts = x0 + chunk * np.arange(npieces, dtype=np.int64)
        ends = np.minimum(starts + chunk, x1)
        pieces = np.repeat(kd[:, t:t + 1], npieces - 1, axis=1)  # pieces 1.. : no hierarchy ranges, no diagonal
        pieces[Col.W0:Col.DIAG1 + 1] = 0
        pieces[Col.X0], pieces[Col.X1], pieces[Col.SLOT] = starts[1:], ends[1:], slot + np.arange(1, npieces)
        extra.append(pieces)
        extra_cost.append(ends[1:] - starts[1:])
        kcost[t] -= (x1 - x0) - (ends[0] - starts[0])  # piece 0 stays in place
        kd[Col.X1, t], kd[Col.SLOT, t] = ends[0], slot
        slot += npieces
    kd = np.concatenate([kd] + extra, axis=1)
    kcost = np.concatenate([kcost] + extra_cost)
    return kd, kcost, np.asarray(red, dtype=np.int64), slot


def _alignment(desc: np.ndarray, cols) -> int:
    """Largest power of two (at most 2**30) dividing the length of every range [desc[c], desc[c + 1]) over all tiles
    (desc: [Col.COUNT, T]). Blocks are powers of two, so a block needs no range mask iff it divides this."""
    bits = 1 << 30
    for c0 in cols:
        bits |= int(np.bitwise_or.reduce(desc[c0 + 1] - desc[c0], initial=0))
    return bits & -bits


# ============================================================================================== the plan
@dataclass
class Plan:
    qdesc: torch.Tensor  # [Tq, Col.COUNT] int32, query tiles of size block_q
    kdesc: torch.Tensor  # [Tk, Col.COUNT] int32, key tiles of size block_k
    vid_l0_end: torch.Tensor  # [V] int32, sorted by (row, start)
    vid_end: torch.Tensor  # [V] int32
    n_qtiles: int
    n_ktiles: int
    q_flat: bool  # every query tile has <= PRE_SLOTS prefix segments: flat loop
    q_align: int  # power-of-two alignment of every key range of the flat query-side loop (prefix slots, W, P, C)
    q_align_hier: int  # of the W, P, C ranges only
    k_align: int  # power-of-two alignment of every query range of the flat dK/dV loop (later tokens X, W, P, C)
    k_align_hier: int  # of the W, P, C ranges only
    rdesc: torch.Tensor | None = None  # [R, RDESC_COLS] int32: split key tiles (row, k0, k1, first slot, pieces)
    n_slots: int = 0  # workspace slots (pieces of split key tiles)
    split_chunk: int = 0


_HIER_COLS = (Col.W0, Col.P0, Col.C0)
_PRE_COLS = tuple(Col.PRE + 2 * r for r in range(PRE_SLOTS))


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
    q_flat = bool(qd.shape[1] == 0 or int(qd[Col.NPRE].max()) <= PRE_SLOTS)
    q_align_hier = _alignment(qd, _HIER_COLS)
    q_align = min(q_align_hier, _alignment(qd, _PRE_COLS))
    k_align_hier = _alignment(kd, _HIER_COLS)
    k_align = min(k_align_hier, _alignment(kd, [Col.X0]))
    # one int32 buffer, one host-to-device copy; tiles sorted by decreasing cost (longest first: load balance)
    sizes = [qd.size, kd.size, l0.size, ve.size, red.size]
    flat = np.empty(sum(sizes), dtype=np.int32)
    parts_np = np.split(flat, np.cumsum(sizes)[:-1])
    for dst, desc, cost in ((parts_np[0], qd, qcost), (parts_np[1], kd, kcost)):
        perm = np.argsort(-cost, kind="stable")
        dst.reshape(-1, Col.COUNT)[:] = desc.T[perm]
    parts_np[2][:], parts_np[3][:], parts_np[4][:] = l0, ve, red.reshape(-1)
    parts = torch.split(torch.from_numpy(flat).to(device), sizes)
    plan = Plan(parts[0].view(-1, Col.COUNT), parts[1].view(-1, Col.COUNT), parts[2], parts[3], qd.shape[1],
                kd.shape[1], q_flat, q_align, q_align_hier, k_align, k_align_hier,
                parts[4].view(-1, RDESC_COLS), n_slots, split_chunk)
    layout._cache[key] = plan
    return plan
