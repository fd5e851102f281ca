"""Pictures of a grouping: the distance heatmap with group boundaries, and AMAD against G."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.grouping import Grouping  # noqa: E402


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes (closed afterwards, so long runs do not accumulate figures)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def distance_heatmap(grouping: Grouping, title: str) -> bytes:
    """D as a heatmap over the grouped layers, with the boundaries of the chosen partition."""
    figure, axes = plt.subplots(figsize=(6.4, 5.4))
    image = axes.imshow(grouping.distance, cmap="viridis", vmin=0)
    figure.colorbar(image, ax=axes, label="mean angular distance D[i, j]")
    labels = [str(layer) for layer in grouping.layers]
    step = -(-len(labels) // 12)  # at most 12 labels: 29 of them ran together on the axis ("9101112…")
    ticks = list(range(0, len(labels), step))
    axes.set_xticks(ticks, [labels[t] for t in ticks])
    axes.set_yticks(ticks, [labels[t] for t in ticks])
    axes.set_xlabel("layer")
    axes.set_ylabel("layer")
    position = 0
    for group in grouping.groups_for(grouping.chosen):
        size = len(group)
        axes.add_patch(plt.Rectangle((position - 0.5, position - 0.5), size, size, fill=False,
                                     edgecolor="white", linewidth=1.8))
        position += size
    axes.set_title(f"{title}\n{grouping.metric} groups at G* = {grouping.chosen}")
    return png_bytes(figure)


def amad_curve(grouping: Grouping, title: str) -> bytes:
    """AMAD against the number of groups, the threshold line and G* marked."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    counts = [point["n_groups"] for point in grouping.curve]
    values = [point["amad"] for point in grouping.curve]
    axes.plot(counts, values, marker="o", markersize=3, label=f"AMAD ({grouping.metric} partitions)")
    axes.axhline(grouping.threshold, color="tab:red", linestyle="--", label=f"threshold {grouping.threshold:g}")
    chosen = grouping.curve[grouping.chosen - 1]
    axes.scatter([chosen["n_groups"]], [chosen["amad"]], color="tab:red", zorder=3, s=40,
                 label=f"G* = {grouping.chosen}")
    axes.set_xlabel("number of groups G")
    axes.set_ylabel("AMAD")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    axes.set_title(title)
    return png_bytes(figure)
