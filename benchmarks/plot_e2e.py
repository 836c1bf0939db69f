"""Plot benchmarks/bench_8b.py --e2e results: from the video file to the first token, stage by stage, one bar per
path (stages one after another; the detector beside decoding; streamed features; a follow-up question).

    python benchmarks/plot_e2e.py e2e.json -o docs/bench_e2e.png

Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json

COLOURS = {"decode": "tab:blue", "to pixels": "tab:cyan", "shots": "tab:orange", "decode + shots": "tab:brown",
           "host to GPU": "tab:gray", "vision": "tab:purple", "decode + vision, streamed": "tab:pink",
           "waiting for shots": "tab:orange", "pruning + decoder": "tab:green", "first token": "tab:olive"}


def _prune_and_decoder(e: dict) -> float:
    """Pruning, merge, decoder and head: the prefill less the vision stage (what the stages' hooks split)."""
    stages = e["stages"]
    split = [stages.get(k) for k in ("pruning + aggregation + merge", "decoder",
                                     "LM head + cache compaction + first token")]
    if all(v is not None for v in split):
        return sum(split)
    return e["prefill_s"] - (stages.get("vision (tower + projector)") or 0.0)


def paths(e: dict):
    """[(label, [(stage, seconds), ...])], one per path the run measured."""
    s = e["stages"]
    rest = [("host to GPU", s["host to GPU"]), ("vision", s["vision (tower + projector)"]),
            ("pruning + decoder", _prune_and_decoder(e))]
    out = [("stages one after another,\nshots cached", [("decode", s["decode (load_video)"]),
                                                         ("to pixels", s["to pixel values (normalise, resize if "
                                                                         "needed; CPU)"]),
                                                         ("shots", s["shots cached (content hash + lookup)"])] + rest)]
    if e.get("overlapped_s") is not None:
        out.append(("shots uncached, detector\nbeside decoding", [("decode + shots", e["overlapped_s"]),
                                                                 ("to pixels", s["to pixel values (normalise, "
                                                                                 "resize if needed; CPU)"])] + rest))
    for case, row in (e.get("streamed") or {}).items():
        if row.get("status") == "ok":
            out.append((f"streamed features,\nshots {case}", [("decode + vision, streamed", row["decode_and_vision_s"]),
                                                              ("waiting for shots", row["shots_wait_s"]),
                                                              ("pruning + decoder", row["prefill_s"])]))
    follow = e.get("follow_up") or {}
    if follow.get("status") == "ok":
        out.append(("follow-up question\n(feature cache)", [("pruning + decoder", follow["seconds"])]))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("-o", "--out", required=True)
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.json) as f:
        data = json.load(f)
    e = data["e2e"]
    rows = paths(e)
    fig, ax = plt.subplots(figsize=(10, 0.75 * len(rows) + 1.6))
    seen, longest = set(), max(sum(v for _, v in st) for _, st in rows)
    for y, (label, stages) in enumerate(reversed(rows)):
        left = 0.0
        for stage, seconds in stages:
            ax.barh(y, seconds, left=left, color=COLOURS[stage], edgecolor="white",
                    label=None if stage in seen else stage)
            seen.add(stage)
            left += seconds
        ax.text(left + 0.01 * longest, y, f"{left:.1f} s", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=9)
    ax.set_xlabel("seconds from the file to the first token")
    device = (data.get("meta") or {}).get("device", "")
    ax.set_title(f"{e.get('duration_s', 0) / 60:.0f} min video, {e['frames']} frames, {e['variant']} "
                 f"({e.get('kept', '-')} kept); {device}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    ax.set_xlim(0, longest * 1.15)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
