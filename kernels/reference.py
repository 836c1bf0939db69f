"""Plain PyTorch reference of hierarchical attention (docs/hierarchical_attention.md). Differentiable through autograd.

Memory stays O(N): nothing of size N x N is built. Video queries gather, frame by frame, their few key frames (the
same-level window, the parent, the children) plus the plain prefix of their sequence; text queries are processed in
chunks against the causal plain keys before them. Each chunk's score tensor is bounded by ``budget`` elements.
Arithmetic is float32 (float64 for float64 inputs); the result is cast back to ``q.dtype``.
"""

from __future__ import annotations

import torch

from .layout import HierLayout

__all__ = ["hierarchical_attention_reference", "check_inputs"]


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 layout: HierLayout) -> tuple[int, int, int, int, int]:
    """Validate shapes and the layout; returns (B, Hq, Hkv, N, D)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, n, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != b or k.shape[2] != n or k.shape[3] != d:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} (need [B, Hkv, N, D])")
    hkv = k.shape[1]
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if not isinstance(layout, HierLayout):
        raise TypeError(f"layout must be a HierLayout, got {type(layout).__name__}")
    layout.validate(b, n)
    return b, hq, hkv, n, d


def _ranges_index(ranges: list[tuple[int, int]], device) -> torch.Tensor:
    parts = [torch.arange(a, b, device=device) for a, b in ranges if b > a]
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(parts)


def _sequence_plan(layout: HierLayout):
    """Per sequence: (row, start, end, videos sorted by start)."""
    spans = layout.video_spans()
    out = []
    for j, (row, s0, s1) in enumerate(layout.seq_list()):
        vids = sorted((sp for sp in spans if sp.seq == j), key=lambda s: s.start)
        out.append((row, s0, s1, vids))
    return out


def hierarchical_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: HierLayout, *,
                                     scale: float | None = None, budget: int = 1 << 24) -> torch.Tensor:
    """Reference implementation. q: [B, Hq, N, D]; k, v: [B, Hkv, N, D]. Returns [B, Hq, N, D] in q's dtype.

    Padding query positions output exactly 0 (and get zero gradients); nothing attends to padding.
    """
    b_, hq, hkv, n_, d = check_inputs(q, k, v, layout)
    g = hq // hkv
    if scale is None:
        scale = d ** -0.5
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    m = layout.tokens_per_frame
    e, a = layout.neighbours, layout.arity

    q5 = q.reshape(b_, hkv, g, n_, d).permute(0, 3, 1, 2, 4)  # [B, N, Hkv, G, D]
    k4 = k.permute(0, 2, 1, 3)  # [B, N, Hkv, D]
    v4 = v.permute(0, 2, 1, 3)

    out_idx: list[torch.Tensor] = []
    out_val: list[torch.Tensor] = []

    def gather_q(row: int, idx: torch.Tensor) -> torch.Tensor:
        return q5[row][idx].to(cdt)

    def gather_kv(row: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k4[row][idx].to(cdt), v4[row][idx].to(cdt)

    for row, s0, s1, vids in _sequence_plan(layout):
        plain: list[tuple[int, int]] = []  # plain (non-aggregated) key ranges before the cursor
        cursor = s0
        runs = []
        for sp in vids:
            runs.append(("text", cursor, sp.start, list(plain)))
            plain.append((cursor, sp.start))
            runs.append(("video", sp, list(plain)))
            plain.append((sp.start, sp.l0_end))
            cursor = sp.end
        runs.append(("text", cursor, s1, list(plain)))

        for run in runs:
            if run[0] == "text":
                _, t0, t1, before = run
                if t1 <= t0:
                    continue
                kb_idx = _ranges_index(before, dev)
                nk_max = kb_idx.numel() + (t1 - t0)
                cq = max(1, budget // max(1, hq * nk_max))
                for c0 in range(t0, t1, cq):
                    c1 = min(t1, c0 + cq)
                    qi = torch.arange(c0, c1, device=dev)
                    ki = torch.cat([kb_idx, torch.arange(t0, c1, device=dev)])
                    kpos = ki
                    mask = kpos[None, :] <= qi[:, None]  # causal; keys before t0 are all allowed
                    qs = gather_q(row, qi)  # [Cq, Hkv, G, D]
                    ks, vs = gather_kv(row, ki)  # [Ck, Hkv, D]
                    s = torch.einsum("qhgd,khd->hgqk", qs, ks) * scale
                    s = s.masked_fill(~mask, float("-inf"))
                    p = torch.softmax(s, dim=-1)
                    o = torch.einsum("hgqk,khd->qhgd", p, vs)
                    out_idx.append(qi + row * n_)
                    out_val.append(o)
            else:
                _, sp, before = run
                counts = sp.counts
                nlev = len(counts)
                # frame table of the video's hierarchy: global frame f -> (level, n)
                lev_off = [0]
                for c in counts:
                    lev_off.append(lev_off[-1] + c)
                nslots = (2 * e + 1) + 1 + a
                kf_rows = []
                for lvl, c in enumerate(counts):
                    for nn in range(c):
                        slots = []
                        for dn in range(-e, e + 1):
                            j = nn + dn
                            slots.append(lev_off[lvl] + j if 0 <= j < c else -1)
                        slots.append(lev_off[lvl + 1] + nn // a if lvl + 1 < nlev else -1)
                        for ch in range(a):
                            j = nn * a + ch
                            slots.append(lev_off[lvl - 1] + j if lvl >= 1 and j < counts[lvl - 1] else -1)
                        kf_rows.append(slots)
                kf = torch.tensor(kf_rows, dtype=torch.long, device=dev)  # [T, nslots]
                nframes = kf.shape[0]
                tok = torch.arange(m, device=dev)
                kvalid = (kf >= 0)[:, :, None].expand(nframes, nslots, m).reshape(nframes, nslots * m)
                ktok = (sp.start + kf.clamp(min=0)[:, :, None] * m + tok).reshape(nframes, nslots * m)
                p_idx = _ranges_index(before, dev)
                kp, vp = gather_kv(row, p_idx)  # [P, Hkv, D]
                per_tok = hq * (p_idx.numel() + nslots * m)
                toks = max(1, budget // max(1, per_tok))
                if toks >= m:
                    fchunk, qchunk = toks // m, m
                else:
                    fchunk, qchunk = 1, toks
                for f0 in range(0, nframes, fchunk):
                    f1 = min(nframes, f0 + fchunk)
                    kidx = ktok[f0:f1]
                    kh, vh = gather_kv(row, kidx.reshape(-1))
                    kh = kh.reshape(f1 - f0, nslots * m, hkv, d)
                    vh = vh.reshape(f1 - f0, nslots * m, hkv, d)
                    valid = kvalid[f0:f1][:, None, None, None, :]
                    for j0 in range(0, m, qchunk):
                        j1 = min(m, j0 + qchunk)
                        qi = sp.start + torch.arange(f0, f1, device=dev)[:, None] * m + torch.arange(j0, j1, device=dev)
                        qs = gather_q(row, qi.reshape(-1)).reshape(f1 - f0, j1 - j0, hkv, g, d)
                        s1_ = torch.einsum("tqhgd,phd->thgqp", qs, kp) * scale
                        s2_ = torch.einsum("tqhgd,tkhd->thgqk", qs, kh) * scale
                        s2_ = s2_.masked_fill(~valid, float("-inf"))
                        p = torch.softmax(torch.cat([s1_, s2_], dim=-1), dim=-1)
                        npre = p_idx.numel()
                        o = torch.einsum("thgqp,phd->tqhgd", p[..., :npre], vp)
                        o = o + torch.einsum("thgqk,tkhd->tqhgd", p[..., npre:], vh)
                        out_idx.append(qi.reshape(-1) + row * n_)
                        out_val.append(o.reshape(-1, hkv, g, d))

    flat = torch.zeros(b_ * n_, hkv, g, d, dtype=cdt, device=dev)
    if out_idx:
        flat = flat.index_copy(0, torch.cat(out_idx), torch.cat(out_val))
    out = flat.reshape(b_, n_, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b_, hq, n_, d)
    return out.to(q.dtype)


def dense_reference_flops(layout: HierLayout, num_heads: int, head_dim: int) -> int:
    """Useful forward FLOPs: 4 * D * allowed pairs * heads (two matmuls, 2 FLOPs per multiply-add)."""
    return 4 * head_dim * layout.allowed_pairs() * num_heads

