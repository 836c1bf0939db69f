"""The needle-in-a-haystack heatmap: accuracy by needle depth (rows, 0 % at the top) and haystack frames
(columns), as in the Sophia paper's figure; cells whose prompt exceeds the server's max_length are hatched grey
and labelled, cells that were sent but got no score are white with "n/a"."""
from __future__ import annotations

from typing import Sequence

import numpy as np

BEYOND_COLOR = "#bdbdbd"


def draw(path: str, frames: Sequence[int], depths: Sequence[int], accuracy: np.ndarray, beyond: np.ndarray,
         *, title: str = "Video needle in a haystack", max_length=None):
    """accuracy, beyond: [len(depths), len(frames)]; accuracy NaN where there is no score. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Rectangle

    accuracy = np.asarray(accuracy, dtype=float)
    beyond = np.asarray(beyond, dtype=bool)
    shown = np.where(beyond, np.nan, accuracy)
    cmap = LinearSegmentedColormap.from_list(
        "niah", ["#d7301f", "#fdae61", "#ffffbf", "#a6d96a", "#1a9641"]).with_extremes(bad="white")
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(frames), 1.2 + 0.55 * len(depths)))
    image = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(frames)):
            if beyond[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=BEYOND_COLOR, hatch="//",
                                       edgecolor="#7f7f7f", linewidth=0.0, label="_beyond"))
                ax.text(j, i, "> max\nlength", ha="center", va="center", fontsize=6, color="#404040")
            elif np.isnan(accuracy[i, j]):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=7)
            else:
                ax.text(j, i, f"{accuracy[i, j]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(frames)), [str(f) for f in frames])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("haystack frames")
    ax.set_ylabel("needle depth")
    ax.set_title(title + (f" (max_length {max_length})" if max_length else ""), fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy", fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    return fig
