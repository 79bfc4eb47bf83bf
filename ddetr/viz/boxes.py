"""Draw boxes on matplotlib axes."""
from matplotlib.patches import Rectangle


def draw_boxes(ax, boxes, labels=None, colour="black", linewidth=1.5):
    """Draw (x0, y0, x1, y1) boxes in pixel coordinates, with optional text labels."""
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                               edgecolor=colour, linewidth=linewidth))
        if labels is not None:
            ax.text(x0, y0 - 1, str(labels[i]), fontsize=7, color=colour,
                    va="bottom", ha="left")
    return ax


def draw_cxcywh(ax, box, size, colour, linestyle="-", linewidth=1.5, alpha=1.0, label=None):
    """One box (cx, cy, w, h) in [0, 1], drawn on an image of `size` pixels (a side, or
    (W, H)), with an optional text label at its top left. Returns the patch."""
    W, H = (size, size) if isinstance(size, (int, float)) else size
    cx, cy, w, h = (float(v) for v in box)
    x0, y0 = (cx - w / 2) * W, (cy - h / 2) * H
    patch = ax.add_patch(Rectangle((x0, y0), w * W, h * H, fill=False, edgecolor=colour,
                                   linestyle=linestyle, linewidth=linewidth, alpha=alpha))
    if label is not None:
        ax.text(x0, y0 - 1, label, fontsize=7, color=colour, va="bottom")
    return patch
