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
