"""From the plain token sequence to Sophia's extended sequence, and back.

The template writes what a plain VLM would see: text tokens, and for every video `frames * M` placeholder
tokens. The model prunes frames, then builds the *extended* sequence that the decoder runs on: every video's
kept level-0 frames are followed directly by its aggregated frames (levels 1 .. L-1). This module computes, from
a few integers per row and video, where every token goes (`ExtendedPlan`), and the layout the hierarchical
attention kernel reads (`sophia_kernels.HierLayout`).

Position ids (docs/hierarchical_attention.md): text and level-0 tokens keep the positions a plain VLM given only the
kept frames would give them (consecutive within each sequence), so aggregated tokens never shift the text. Token m
of aggregated frame (l, n) takes the position of token m of the middle level-0 frame of the span it summarises,
frame min(n * A**l + (A**l - 1) // 2, F' - 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from sophia_kernels import HierLayout, level_counts


@dataclass
class VideoRun:
    """One video as it appears in the plain sequence."""

    row: int
    start: int  # first placeholder token in the plain row
    frames: int  # frames sampled (placeholder tokens = frames * M)
    kept: List[int]  # indices of the frames kept by pruning, sorted


@dataclass
class ExtendedPlan:
    """Where every token of the extended sequence comes from, and where every plain token went."""

    length: int  # N_ext, the longest extended row
    # For every extended position (B * N_ext): index into cat([plain embeddings (B * N), visual bank]), or -1 (pad).
    source: torch.Tensor
    # For every plain position (B * N): its extended position (flat, row-major), or -1 (padding or pruned frame).
    plain_to_extended: torch.Tensor
    position_ids: torch.Tensor  # [B, N_ext]
    layout: HierLayout
    # Per row, the extended positions that stay in the KV cache after prefill (text and level-0 tokens).
    cache_keep: List[torch.Tensor]
    next_position: torch.Tensor  # [B], the position the next generated token takes


def find_video_runs(is_video: torch.Tensor, frame_counts: Sequence[int], tokens_per_frame: int) -> List[VideoRun]:
    """Locate each video's placeholder run (`is_video`: bool [B, N]), in row-major order, and check it against the
    frame counts."""
    spans = []  # (row, start, placeholder tokens)
    for row in range(is_video.shape[0]):
        flags = is_video[row].to(torch.int8)
        if not bool(flags.any()):
            continue
        edges = torch.diff(flags, prepend=flags.new_zeros(1), append=flags.new_zeros(1))
        starts = (edges == 1).nonzero().flatten().tolist()
        ends = (edges == -1).nonzero().flatten().tolist()
        spans.extend((row, s, e - s) for s, e in zip(starts, ends))
    if len(spans) != len(frame_counts):
        raise ValueError(f"the batch holds {len(spans)} runs of video placeholder tokens but {len(frame_counts)} "
                         "videos were given: every <video> tag needs exactly one video")
    runs: List[VideoRun] = []
    for i, ((row, start, tokens), frames) in enumerate(zip(spans, frame_counts)):
        frames = int(frames)
        if tokens != frames * tokens_per_frame:
            raise ValueError(f"video {i} has {tokens} placeholder tokens in row {row}, expected "
                             f"{frames} frames x {tokens_per_frame} tokens; was the input truncated "
                             "(--max_length too small) or built with another tokens_per_frame?")
        runs.append(VideoRun(row=row, start=start, frames=frames, kept=list(range(frames))))
    return runs


def plain_sequences(attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                    batch: int, length: int) -> List[List[tuple]]:
    """Per row, the (start, end) of each sequence in the plain row.

    Padded batches: one sequence per row over the attended tokens (left or right padding). Packed rows
    (ms-swift padding_free): a new sequence starts wherever position_ids restarts at 0.
    """
    rows: List[List[tuple]] = []
    for b in range(batch):
        if attention_mask is not None:
            valid = attention_mask[b].nonzero().flatten()
            if valid.numel() == 0:
                rows.append([])
                continue
            s, e = int(valid[0]), int(valid[-1]) + 1
            if e - s != valid.numel():
                raise ValueError("attention_mask must be contiguous ones with padding on one side only")
        else:
            s, e = 0, length
        if position_ids is not None and attention_mask is None:
            pos = position_ids[b]
            restarts = (pos[s:e] == 0).nonzero().flatten().add(s).tolist()
            bounds = sorted(set([s] + restarts)) + [e]
            rows.append([(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]])
        else:
            rows.append([(s, e)])
    return rows


def build_extended_plan(plain: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        position_ids: Optional[torch.Tensor], runs: List[VideoRun], *, tokens_per_frame: int,
                        arity: int, levels: int, neighbours: int) -> ExtendedPlan:
    """Lay out the extended rows (valid tokens first, padding at the end of each row). `plain` is any [B, N]
    tensor of the plain sequence (its shape and device are used).

    The visual bank that `source` indexes after the plain embeddings holds, video after video, the kept
    level-0 frames and then the aggregated frames of levels 1.., each frame M consecutive tokens.
    """
    batch, length = plain.shape[:2]
    m = tokens_per_frame
    device = plain.device
    runs_by_row: List[List[VideoRun]] = [[] for _ in range(batch)]
    for run in runs:
        runs_by_row[run.row].append(run)

    rows: List[_ExtendedRow] = []
    seqs, videos = [], []
    next_position = torch.zeros(batch, dtype=torch.long)
    bank_offset = batch * length
    for b, row_seqs in enumerate(plain_sequences(attention_mask, position_ids, batch, length)):
        row = _ExtendedRow(b * length, torch.full((length,), -1, dtype=torch.long))
        for s, e in row_seqs:
            seq_start, row.p, t = row.cursor, 0, s  # positions restart with every sequence
            for run in [r for r in runs_by_row[b] if s <= r.start < e]:
                if run.start + run.frames * m > e:
                    raise ValueError(f"video placeholder run at row {b}, token {run.start} crosses the end of its "
                                     "sequence")
                row.add_text(t, run.start)
                videos.append((b, row.cursor, len(run.kept)))
                bank_offset += row.add_video(run, bank_offset, level_counts(len(run.kept), arity, levels), m, arity)
                t = run.start + run.frames * m
            row.add_text(t, e)
            seqs.append((b, seq_start, row.cursor))
            next_position[b] = row.p
        rows.append(row)

    n_ext = max((row.cursor for row in rows), default=0)
    source = torch.full((batch, n_ext), -1, dtype=torch.long)
    position_out = torch.zeros((batch, n_ext), dtype=torch.long)
    plain_to_extended = torch.full((batch, length), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        source[b, :row.cursor] = _cat(row.src)
        position_out[b, :row.cursor] = _cat(row.pos)
        plain_to_extended[b] = torch.where(row.p2e >= 0, row.p2e + b * n_ext, row.p2e)
    layout = HierLayout.from_lists(seqs, videos, m, arity, levels, neighbours)
    return ExtendedPlan(length=n_ext, source=source.view(-1).to(device),
                        plain_to_extended=plain_to_extended.view(-1).to(device),
                        position_ids=position_out.to(device), layout=layout.to(device),
                        cache_keep=[_cat(row.keep).to(device) for row in rows],
                        next_position=next_position.to(device))


@dataclass
class _ExtendedRow:
    """One extended row while it is built: where its tokens come from, their positions, what the cache keeps."""

    plain_offset: int  # index of the row's first plain token in the flattened plain embeddings
    p2e: torch.Tensor  # [N]: extended position of every plain token of the row, -1 if none
    src: List[torch.Tensor] = field(default_factory=list)
    pos: List[torch.Tensor] = field(default_factory=list)
    keep: List[torch.Tensor] = field(default_factory=list)
    cursor: int = 0  # extended position of the next token
    p: int = 0  # position id of the next token

    def add_text(self, t0: int, t1: int) -> None:
        """Plain tokens [t0, t1) of the row, copied as they are and kept in the cache."""
        n = t1 - t0
        self.src.append(torch.arange(self.plain_offset + t0, self.plain_offset + t1))
        self.pos.append(torch.arange(self.p, self.p + n))
        self.p2e[t0:t1] = torch.arange(self.cursor, self.cursor + n)
        self.keep.append(torch.arange(self.cursor, self.cursor + n))
        self.cursor += n
        self.p += n

    def add_video(self, run: VideoRun, bank_start: int, counts: List[int], m: int, arity: int) -> int:
        """The run's kept level-0 frames, then its aggregated levels, taken from the visual bank at
        ``bank_start``; only the level-0 tokens stay in the cache. Returns the bank tokens used."""
        n_bank = sum(counts) * m
        self.src.append(torch.arange(bank_start, bank_start + n_bank))
        self.pos.append(_video_positions(self.p, counts, m, arity))
        for j, f in enumerate(run.kept):
            self.p2e[run.start + f * m: run.start + (f + 1) * m] = torch.arange(self.cursor + j * m,
                                                                               self.cursor + (j + 1) * m)
        l0_tokens = len(run.kept) * m
        self.keep.append(torch.arange(self.cursor, self.cursor + l0_tokens))
        self.cursor += n_bank
        self.p += l0_tokens
        return n_bank


def _cat(parts: List[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _video_positions(first: int, counts: List[int], m: int, arity: int) -> torch.Tensor:
    """Positions of a video's extended span: level 0 consecutive, aggregated frames at their span's middle."""
    frames = counts[0]
    out = [torch.arange(first, first + frames * m)]
    token = torch.arange(m)
    for level, count in enumerate(counts[1:], start=1):
        span = arity ** level
        middle = torch.clamp(torch.arange(count) * span + (span - 1) // 2, max=frames - 1)
        out.append((first + middle[:, None] * m + token[None, :]).flatten())
    return torch.cat(out)


__all__ = ["VideoRun", "ExtendedPlan", "find_video_runs", "plain_sequences", "build_extended_plan"]
