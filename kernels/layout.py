"""Layout of packed sequences and videos for hierarchical attention (docs/hierarchical_attention.md).

A batch row of N tokens holds one or more packed sequences ``(row, start, end)``; tokens of a row in no sequence
are padding. A video ``(row, start, frames)`` occupies, from ``start`` on, its level-0 frames followed by its
aggregated levels (the "extended" span)::

    level l starts at start + M * sum(counts[:l]); the span ends at start + M * sum(counts)

with ``counts = level_counts(frames, arity, levels)`` and M = ``tokens_per_frame``. Everything here is a few
integers per sequence and per video: nothing of size N or N^2 is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Sequence

import torch

__all__ = ["HierLayout", "VideoSpan", "level_counts"]


def check_hierarchy(arity: int, levels: int, neighbours: int = 0) -> None:
    """The hierarchy's settings, checked in one place for the layout and the model config: A >= 2 (a parent of one
    child would repeat it), L >= 1, E >= 0."""
    if arity < 2:
        raise ValueError(f"arity (hier_arity) must be >= 2, got {arity}")
    if levels < 1:
        raise ValueError(f"levels (hier_levels) must be >= 1, got {levels}")
    if neighbours < 0:
        raise ValueError(f"neighbours (hier_neighbours) must be >= 0, got {neighbours}")


def level_counts(frames: int, arity: int, levels: int) -> list[int]:
    """Frames per level: ``count_0 = frames``, ``count_{l+1} = ceil(count_l / arity)`` for ``l + 1 < levels``,
    stopping early once a level has a single frame ("trapezoid").

    >>> level_counts(1, 2, 4), level_counts(5, 2, 4), level_counts(16, 2, 4)
    ([1], [5, 3, 2, 1], [16, 8, 4, 2])
    """
    frames, arity, levels = int(frames), int(arity), int(levels)
    if frames < 1:
        raise ValueError(f"a video needs at least one frame, got frames={frames}")
    check_hierarchy(arity, levels)
    counts = [frames]
    while len(counts) < levels and counts[-1] > 1:
        counts.append(-(-counts[-1] // arity))
    return counts


class VideoSpan(NamedTuple):
    """Geometry of one video, all in token offsets of its batch row."""

    index: int  # index of the video in ``HierLayout.videos``
    row: int
    start: int  # first level-0 token
    frames: int  # level-0 frames F'
    counts: tuple[int, ...]  # frames per level
    level_starts: tuple[int, ...]  # first token of each level (level_starts[0] == start)
    l0_end: int  # end of the level-0 tokens (start + M * frames)
    end: int  # end of the extended span (start + M * sum(counts))
    seq: int  # index of the sequence (in ``HierLayout.seqs``) that holds the video, -1 before validation


def _as_table(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        rows = [tuple(int(v) for v in r) for r in x]
        t = torch.tensor(rows, dtype=torch.int64) if rows else torch.zeros((0, 3), dtype=torch.int64)
    if t.dim() == 1 and t.numel() == 0:
        t = t.reshape(0, 3)
    if t.dim() != 2 or t.shape[1] != 3:
        raise ValueError(f"HierLayout.{name} must have shape [*, 3], got {tuple(t.shape)}")
    if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"HierLayout.{name} must be an integer tensor, got {t.dtype}")
    return t


@dataclass(frozen=True, eq=False)
class HierLayout:
    """Packed sequences and videos of a batch (see the module docstring).

    ``seqs``: integer tensor [S, 3] of (row, start, end); ``videos``: integer tensor [V, 3] of (row, start, frames).
    Lists of triples are accepted too. The object is immutable and compares by identity; kernels cache their tile
    schedule on it, so build one layout per batch and reuse it in every layer.
    """

    seqs: torch.Tensor
    videos: torch.Tensor
    tokens_per_frame: int
    arity: int = 2
    levels: int = 4
    neighbours: int = 2
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "seqs", _as_table(self.seqs, "seqs"))
        object.__setattr__(self, "videos", _as_table(self.videos, "videos"))
        for name in ("tokens_per_frame", "arity", "levels", "neighbours"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.tokens_per_frame < 1:
            raise ValueError(f"tokens_per_frame must be >= 1, got {self.tokens_per_frame}")
        check_hierarchy(self.arity, self.levels, self.neighbours)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_lists(cls, seqs: Iterable[Sequence[int]], videos: Iterable[Sequence[int]], tokens_per_frame: int,
                   arity: int = 2, levels: int = 4, neighbours: int = 2) -> "HierLayout":
        """Build from python lists of (row, start, end) and (row, start, frames) triples."""
        return cls(_as_table(list(seqs), "seqs"), _as_table(list(videos), "videos"), tokens_per_frame, arity,
                   levels, neighbours)

    @classmethod
    def from_segments(cls, rows: Sequence[Sequence], tokens_per_frame: int, arity: int = 2, levels: int = 4,
                      neighbours: int = 2) -> tuple["HierLayout", int]:
        """Build a layout from a description of each batch row, and return it with the row length N needed.

        Each row is a list whose items are sequences (lists) or padding ``("pad", n)``. A sequence is a list of
        items: an ``int`` n is n text tokens, ``("video", F)`` a video of F level-0 frames (its extended span,
        aggregated levels included, is inserted there). Rows shorter than the longest one are padded at the end.

        >>> layout, n = HierLayout.from_segments([[[64, ("video", 32), 64]]], tokens_per_frame=256)
        """
        seqs, videos, lengths = [], [], []
        for r, row in enumerate(rows):
            pos = 0
            for item in row:
                if isinstance(item, tuple) and item and item[0] == "pad":
                    pos += int(item[1])
                    continue
                s0 = pos
                for it in item:
                    if isinstance(it, tuple) and it and it[0] == "video":
                        frames = int(it[1])
                        videos.append((r, pos, frames))
                        pos += tokens_per_frame * sum(level_counts(frames, arity, levels))
                    elif isinstance(it, tuple) and it and it[0] == "text":
                        pos += int(it[1])
                    else:
                        pos += int(it)
                if pos > s0:
                    seqs.append((r, s0, pos))
            lengths.append(pos)
        n = max(lengths) if lengths else 0
        return cls.from_lists(seqs, videos, tokens_per_frame, arity, levels, neighbours), n

    # ------------------------------------------------------------------ geometry
    def counts(self, frames: int) -> list[int]:
        return level_counts(frames, self.arity, self.levels)

    def extended_tokens(self, frames: int) -> int:
        """Tokens of a video's extended span (all levels)."""
        return self.tokens_per_frame * sum(self.counts(frames))

    @property
    def num_seqs(self) -> int:
        return int(self.seqs.shape[0])

    @property
    def num_videos(self) -> int:
        return int(self.videos.shape[0])

    def seq_list(self) -> list[tuple[int, int, int]]:
        return [tuple(r) for r in self.seqs.tolist()]

    def video_spans(self) -> list[VideoSpan]:
        """Geometry of every video, in the order of ``self.videos``. Cached."""
        spans = self._cache.get("video_spans")
        if spans is not None:
            return spans
        m = self.tokens_per_frame
        seqs = self.seq_list()
        spans = []
        for i, (row, start, frames) in enumerate(self.videos.tolist()):
            counts = tuple(self.counts(frames))
            starts, pos = [], start
            for c in counts:
                starts.append(pos)
                pos += m * c
            seq = -1
            for j, (sr, s0, s1) in enumerate(seqs):
                if sr == row and s0 <= start < s1:
                    seq = j
                    break
            spans.append(VideoSpan(i, row, start, frames, counts, tuple(starts), start + m * frames, pos, seq))
        self._cache["video_spans"] = spans
        return spans

    def to(self, device) -> "HierLayout":
        """Same layout with its tables on ``device`` (kernels read them on the host anyway; this is a convenience)."""
        return HierLayout(self.seqs.to(device), self.videos.to(device), self.tokens_per_frame, self.arity,
                          self.levels, self.neighbours)

    # ------------------------------------------------------------------ validation
    def validate(self, batch_size: int | None = None, seq_len: int | None = None) -> "HierLayout":
        """Check the layout; raise ``ValueError`` with a clear message on the first problem. Returns self.

        Sequences must lie inside their rows and not overlap; every video needs >= 1 frame, its extended span must
        lie inside one sequence of its row, and videos must not overlap each other.
        """
        key = ("valid", batch_size, seq_len)
        if self._cache.get(key):
            return self
        seqs = self.seq_list()
        by_row: dict[int, list[tuple[int, int, int]]] = {}
        for j, (row, s0, s1) in enumerate(seqs):
            if row < 0 or (batch_size is not None and row >= batch_size):
                raise ValueError(f"sequence {j} (row={row}, start={s0}, end={s1}): row outside the batch "
                                 f"(batch size {batch_size})")
            if not 0 <= s0 < s1:
                raise ValueError(f"sequence {j} (row={row}, start={s0}, end={s1}): need 0 <= start < end")
            if seq_len is not None and s1 > seq_len:
                raise ValueError(f"sequence {j} (row={row}, start={s0}, end={s1}) ends past the row length "
                                 f"{seq_len}")
            by_row.setdefault(row, []).append((s0, s1, j))
        for row, lst in by_row.items():
            lst.sort()
            for (a0, a1, ja), (b0, b1, jb) in zip(lst, lst[1:]):
                if b0 < a1:
                    raise ValueError(f"sequences {ja} [{a0}, {a1}) and {jb} [{b0}, {b1}) overlap in row {row}")
        vids_by_row: dict[int, list[tuple[int, int, int]]] = {}
        for i, (row, start, frames) in enumerate(self.videos.tolist()):
            if frames < 1:
                raise ValueError(f"video {i} (row={row}, start={start}) has frames={frames}; need >= 1")
            end = start + self.extended_tokens(frames)
            inside = [j for (s0, s1, j) in by_row.get(row, []) if s0 <= start and end <= s1]
            if not inside:
                raise ValueError(f"video {i} (row={row}, start={start}, frames={frames}) spans [{start}, {end}) "
                                 f"(level-0 frames plus aggregated levels, M={self.tokens_per_frame}), which is "
                                 f"not inside one sequence of row {row}")
            vids_by_row.setdefault(row, []).append((start, end, i))
        for row, lst in vids_by_row.items():
            lst.sort()
            for (a0, a1, ia), (b0, b1, ib) in zip(lst, lst[1:]):
                if b0 < a1:
                    raise ValueError(f"videos {ia} [{a0}, {a1}) and {ib} [{b0}, {b1}) overlap in row {row}")
        self._cache[key] = True
        return self

    # ------------------------------------------------------------------ per-token view (tests, FlexAttention)
    def token_metadata(self, batch_size: int, seq_len: int, device=None) -> dict[str, torch.Tensor]:
        """Per-token int32 tensors of shape [B, N]: ``seq`` (sequence index, -1 for padding), ``video`` (-1 for
        text), ``level`` (-1 for text), ``frame`` (frame index in its level, -1 for text), ``video_start`` (first
        level-0 token of the token's video, -1 for text). O(B*N) memory; meant for tests and for
        building masks of other attention backends (FlexAttention), never used by the kernels."""
        self.validate(batch_size, seq_len)
        shape = (batch_size, seq_len)
        seq = torch.full(shape, -1, dtype=torch.int32)
        video = torch.full(shape, -1, dtype=torch.int32)
        level = torch.full(shape, -1, dtype=torch.int32)
        frame = torch.full(shape, -1, dtype=torch.int32)
        vstart = torch.full(shape, -1, dtype=torch.int32)
        m = self.tokens_per_frame
        for j, (row, s0, s1) in enumerate(self.seq_list()):
            seq[row, s0:s1] = j
        for sp in self.video_spans():
            video[sp.row, sp.start:sp.end] = sp.index
            vstart[sp.row, sp.start:sp.end] = sp.start
            for lvl, (c, ls) in enumerate(zip(sp.counts, sp.level_starts)):
                level[sp.row, ls:ls + m * c] = lvl
                frame[sp.row, ls:ls + m * c] = torch.arange(c, dtype=torch.int32).repeat_interleave(m)
        out = {"seq": seq, "video": video, "level": level, "frame": frame, "video_start": vstart}
        if device is not None:
            out = {k: v.to(device) for k, v in out.items()}
        return out

    def allowed_pairs(self) -> int:
        """Number of allowed (query, key) pairs of the whole batch (per head), computed from the integers."""
        m, e, a = self.tokens_per_frame, self.neighbours, self.arity
        total = 0
        spans = self.video_spans()
        for j, (row, s0, s1) in enumerate(self.seq_list()):
            vids = sorted((sp for sp in spans if sp.row == row and s0 <= sp.start < s1), key=lambda s: s.start)
            cursor, plain_before = s0, 0  # plain (non-aggregated) tokens before `cursor`
            for sp in vids:
                t = sp.start - cursor  # text run before the video: causal over plain tokens
                total += t * plain_before + t * (t + 1) // 2
                plain_before += t
                ext = sp.end - sp.start
                total += ext * plain_before  # every token of the video sees the plain prefix
                for lvl, c in enumerate(sp.counts):
                    for n in range(c):
                        kf = min(c - 1, n + e) - max(0, n - e) + 1
                        if lvl + 1 < len(sp.counts):
                            kf += 1
                        if lvl >= 1:
                            kf += min(sp.counts[lvl - 1], n * a + a) - n * a
                        total += m * m * kf
                plain_before += m * sp.frames
                cursor = sp.end
            t = s1 - cursor
            total += t * plain_before + t * (t + 1) // 2
        return total
