"""Chapter 1's and 2's small pictures of assignment and pooling: one-to-one matching
against nearest-object assignment and NMS, and the colours that RoIAlign and uniform
attention read."""
import matplotlib.pyplot as plt
import numpy as np

from .boxes import draw_cxcywh


def plot_matching_vs_nms(image, targets, predictions, assignments, nms_keep, titles):
    """Three panels on the same image: predictions joined to the objects they are
    assigned to, one-to-many (nearest object) and one-to-one (Hungarian), and the
    predictions that NMS keeps.

    Args:
        image: (S, S, 3); targets (T, 4) and predictions (P, 4) boxes (cx, cy, w, h) in
        [0, 1]; assignments: two lists of (prediction, object) pairs (one-to-many,
        one-to-one); nms_keep: indices of the predictions NMS keeps; titles: 3 strings.
    Returns the Figure.
    """
    size = image.shape[0]
    colours = plt.get_cmap("tab10")(np.arange(len(predictions)) % 10)
    fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.4))
    for k, ax in enumerate(axes):
        ax.imshow(image, extent=(0, size, size, 0))
        ax.set_axis_off()
        ax.set_title(titles[k], fontsize=8)
        for j, box in enumerate(targets):
            draw_cxcywh(ax, box, size, "white", linewidth=2.2)
            draw_cxcywh(ax, box, size, "black", linestyle=":", linewidth=1.2,
                         label=f"object {j}")
        shown = range(len(predictions)) if k < 2 else nms_keep
        for i in shown:
            draw_cxcywh(ax, predictions[i], size, colours[i], label=f"p{i}")
        if k < 2:
            for i, j in assignments[k]:
                (px, py), (tx, ty) = predictions[i][:2] * size, targets[j][:2] * size
                ax.annotate("", (tx, ty), (px, py), arrowprops=dict(
                    arrowstyle="->", color=colours[i], linewidth=1.6))
        ax.set_xlim(0, size)
        ax.set_ylim(size, 0)
    fig.tight_layout()
    return fig


def plot_colour_swatches(rows, row_labels, column_labels, title=None):
    """A grid of colour swatches: rows (R, Cols, 3) RGB in [0, 1], one row per object,
    one column per way of reading it (e.g. RoIAlign, uniform attention). Returns the
    Figure."""
    rows = np.asarray(rows)
    R, Cols = rows.shape[:2]
    fig, ax = plt.subplots(figsize=(1.2 * Cols + 1.6, 0.45 * R + 0.7))
    ax.imshow(rows.clip(0, 1), aspect="auto", interpolation="nearest")
    ax.set_xticks(range(Cols))
    ax.set_xticklabels(column_labels, fontsize=8)
    ax.set_yticks(range(R))
    ax.set_yticklabels(row_labels, fontsize=8)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    if title:
        ax.set_title(title, fontsize=9, pad=22)
    fig.tight_layout()
    return fig
