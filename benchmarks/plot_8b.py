"""Plot benchmarks/bench_8b.py results: prefill time and peak memory against frames, dense vs Sophia.

    python benchmarks/plot_8b.py prefill.json [train.json ...] -o docs/bench_8b.png

Several JSON files (one per run, e.g. split across time-limited calls) are merged; a later file's case replaces
an earlier one with the same variant and frames. Out-of-memory cases are marked with an x on the top edge of
each panel (labelled with the failed allocation). When the files hold training steps too, a second row shows
s / step and peak memory per variant and mode. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

COLOURS = {"dense": "tab:red", "sophia-0": "tab:blue", "sophia-30": "tab:green",
           "sophia-0 + liger_kernel": "tab:cyan", "sophia-30 + liger_kernel": "tab:olive",
           "sophia-0@1024": "tab:gray", "sophia-0@1280": "tab:brown", "sophia-0@1536": "tab:purple",
           "sophia-30@auto": "tab:pink"}
MODES = {"stage1": "-", "lora": "--"}


def load(paths):
    meta, prefill, train = None, {}, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        meta = meta or data.get("meta")
        # runs with Sophia settings (e.g. --set liger_kernel=true) are series of their own
        settings = (data.get("meta") or {}).get("sophia_settings") or {}
        suffix = "".join(f" + {k}={v}" if v is not True else f" + {k}" for k, v in sorted(settings.items()))
        for r in data.get("prefill") or []:
            r["variant"] += suffix if r["variant"] != "dense" else ""
            prefill[(r["variant"], r["frames"])] = r
        for r in data.get("train") or []:
            r["variant"] += suffix if r["variant"] != "dense" else ""
            train[(r["variant"], r["mode"], r["frames"])] = r
    return meta or {}, list(prefill.values()), list(train.values())


OTHER_COLOURS = ["tab:orange", "black", "gold", "navy", "teal", "magenta", "lime", "maroon"]  # none of COLOURS'


def _colour(variant, i):
    return COLOURS.get(variant, OTHER_COLOURS[i % len(OTHER_COLOURS)])


def _failed(row) -> str:
    m = re.search(r"failed allocation ([\d.]+ \w+)", row.get("status", ""))
    return m.group(1) if m else ""


def panel(ax, rows, key, ylabel, title, series, style=lambda s: "-", label=lambda s: s, limit=None):
    import matplotlib.transforms as mtransforms

    top = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    any_value = False
    for i, s in enumerate(series):
        pts = sorted((r for r in rows if r["_series"] == s), key=lambda r: r["frames"])
        ok = [(r["frames"], r[key]) for r in pts if r.get("status") == "ok" and r.get(key) is not None]
        colour = _colour(s if isinstance(s, str) else s[0], i)
        if ok:
            any_value = True
            ax.plot([x for x, _ in ok], [y for _, y in ok], style(s), marker="o", color=colour, label=label(s))
            for x, y in ok:
                kept = next((r.get("kept") for r in pts if r["frames"] == x), None)
                if key == "seconds" and kept is not None and kept != x:
                    ax.annotate(f"{kept}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                                color=colour)
        for r in pts:
            if str(r.get("status", "")).startswith("OOM"):
                ax.plot([r["frames"]], [0.97], marker="x", markersize=9, mew=2, color=colour, transform=top,
                        clip_on=False, label=None)
                ax.annotate(f"OOM {_failed(r)}".strip(), (r["frames"], 0.97), xycoords=top, fontsize=7,
                            color=colour, textcoords="offset points", xytext=(5, -12 - 9 * (i % 3)))
    values = [r[key] for r in rows if r.get("status") == "ok" and r.get(key) is not None]
    if limit:
        ax.axhline(limit, color="grey", lw=0.8, ls=":")
        ax.annotate("GPU memory left after weights", (0.3, limit), xycoords=("axes fraction", "data"), fontsize=7,
                    color="grey", xytext=(0, -10), textcoords="offset points")
        values.append(limit)
    if values:  # headroom above the data for the OOM marks on the top edge
        if key == "seconds":
            ax.set_ylim(min(values) / 1.5, max(values) * 4)
        else:
            ax.set_ylim(0, max(values) * 1.3)
    ax.set_xscale("log", base=2)
    frames = sorted({r["frames"] for r in rows})
    ax.set_xticks(frames)
    ax.set_xticklabels([str(f) for f in frames])
    if key == "seconds" and any_value:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:g}"[0] in "25" else ""))
    ax.set_xlabel("frames")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if any_value:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no values (CPU run, or every case failed)", ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="grey")


def plot(paths, output):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, prefill, train = load(paths)
    nrows = 2 if train else 1
    fig, axes = plt.subplots(nrows, 2, figsize=(15, 4.6 * nrows), squeeze=False)
    limit = None
    if meta.get("device_memory_gib") and meta.get("models"):
        limit = meta["device_memory_gib"] - max(m["weights_gib"] for m in meta["models"].values())
    for r in prefill:
        r["_series"] = r["variant"]
    series = list(dict.fromkeys(r["variant"] for r in prefill))
    panel(axes[0][0], prefill, "seconds", "prefill seconds (log)", "Prefill from pixels, KV cache on", series)
    panel(axes[0][1], prefill, "peak_gib", "peak GiB beyond weights and inputs", "Prefill peak GPU memory", series,
          limit=limit)
    if train:
        for r in train:
            r["_series"] = (r["variant"], r["mode"])
        tseries = list(dict.fromkeys(r["_series"] for r in train))
        style = lambda s: MODES.get(s[1], "-")  # noqa: E731
        label = lambda s: f"{s[0]} {s[1]}"  # noqa: E731
        panel(axes[1][0], train, "seconds", "seconds / step (log)", "Training step (gradient checkpointing)",
              tseries, style, label)
        panel(axes[1][1], train, "peak_gib", "peak GiB beyond weights and inputs", "Training step peak GPU memory",
              tseries, style, label, limit=limit)
    title = f"{meta.get('shape', '?')} on {meta.get('device', '?')}"
    if meta.get("torch"):
        title += f" (torch {meta['torch']}, transformers {meta.get('transformers')})"
    fig.suptitle(title + "\nnumbers beside Sophia 30/30 points: frames kept; x on the top edge: out of memory",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(output, dpi=130)
    print(f"wrote {output}")
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", help="results of benchmarks/bench_8b.py --json")
    parser.add_argument("-o", "--output", default="bench_8b.png")
    args = parser.parse_args(argv)
    plot(args.json, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
