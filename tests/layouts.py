"""Random layouts for the attention tests: one generator, ``random_rows``, with the presets the tests use.

Rows are in the ``HierLayout.from_segments`` format: a row is a list of sequences (lists of ``int`` text runs and
``("video", frames)`` items) and ``("pad", n)`` padding runs. Every count drawn as ``(lo, hi)`` is
``rng.randint(lo, hi)``; a plain ``int`` is used as is (no draw). The draws happen in a fixed order, so a seed
always gives the same layout.
"""

from __future__ import annotations

import random

from sophia_kernels import HierLayout

__all__ = ["random_rows", "random_layout", "REFERENCE", "INTERPRETER", "INTERPRETER_PACKED", "GPU"]


def _count(rng: random.Random, spec) -> int:
    return rng.randint(*spec) if isinstance(spec, tuple) else int(spec)


def random_rows(rng: random.Random, *, rows=1, seqs=1, items=(1, 4), p_pad=0.3, pad=(1, 5), p_video=0.6,
                frames=(1, 6), text=(1, 20), p_pad_end=None, pad_end=(1, 4)) -> list:
    """``rows`` batch rows of ``seqs`` sequences of ``items`` items each. Before each sequence, padding of ``pad``
    tokens with probability ``p_pad``; each item is a video of ``frames`` frames with probability ``p_video``,
    else ``text`` text tokens; after the last sequence of a row, padding of ``pad_end`` tokens with probability
    ``p_pad_end`` (None: never, and no draw)."""
    out = []
    for _ in range(_count(rng, rows)):
        row = []
        for _ in range(_count(rng, seqs)):
            if rng.random() < p_pad:
                row.append(("pad", rng.randint(*pad)))
            seq = []
            for _ in range(_count(rng, items)):
                if rng.random() < p_video:
                    seq.append(("video", rng.randint(*frames)))
                else:
                    seq.append(rng.randint(*text))
            row.append(seq)
        if p_pad_end is not None and rng.random() < p_pad_end:
            row.append(("pad", rng.randint(*pad_end)))
        out.append(row)
    return out


# presets (keyword arguments of random_rows)
REFERENCE = dict(rows=(1, 3), seqs=(1, 3), items=(1, 4), p_pad=0.3, pad=(1, 5), p_video=0.55, frames=(1, 7),
                 text=(1, 6), p_pad_end=0.3, pad_end=(1, 4))  # tiny frames: the float64 dense oracle
INTERPRETER = dict(rows=1, seqs=1, items=(2, 4), p_pad=0.5, pad=(1, 5), p_video=0.6, frames=(1, 6), text=(1, 20))
INTERPRETER_PACKED = dict(INTERPRETER, rows=2, seqs=(1, 2), p_pad=1.0)  # packed rows, padding before every sequence
GPU = dict(rows=2, seqs=(1, 2), items=(1, 4), p_pad=0.4, pad=(1, 200), p_video=0.6, frames=(1, 10),
           text=(1, 300))  # frames of 16-256 tokens, long text runs


def random_layout(rng: random.Random, **preset) -> tuple[HierLayout, int]:
    """A random layout (tokens per frame, arity, levels, neighbours drawn first) and its row length, for the dense
    oracle: 1-4 tokens per frame. ``preset`` overrides ``REFERENCE``'s rows."""
    m = rng.choice([1, 2, 3, 4])
    a = rng.choice([2, 2, 3])
    lv = rng.choice([1, 2, 3, 4, 6])
    e = rng.choice([0, 1, 2])
    rows = random_rows(rng, **{**REFERENCE, **preset})
    return HierLayout.from_segments(rows, tokens_per_frame=m, arity=a, levels=lv, neighbours=e)
