"""Drawing detections: boxes with class names and scores on an image."""
import matplotlib.pyplot as plt
from matplotlib import patches


def draw_detections(image, boxes, labels, scores=None, categories=None, ax=None,
                    color="yellow", title=None):
    """Draw absolute x0y0x1y1 boxes on an image (PIL, or an (H, W, 3) array).

    Args:
        boxes: (T, 4) absolute x0y0x1y1; labels (T,) category ids; scores (T,) or None.
        categories: {id: name}, for the captions.
    Returns:
        the matplotlib Axes.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image)
    scores = [None] * len(boxes) if scores is None else list(scores)
    for box, label, score in zip(boxes.tolist() if hasattr(boxes, "tolist") else boxes,
                                 list(labels), scores):
        x0, y0, x1, y1 = box
        ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                       edgecolor=color, linewidth=1.5))
        name = (categories or {}).get(int(label), str(int(label)))
        text = name if score is None else f"{name} {float(score):.2f}"
        ax.text(x0, y0, text, fontsize=7, color="black", va="bottom",
                bbox=dict(facecolor=color, alpha=0.7, pad=1, edgecolor="none"))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return ax
