"""A toy image drawn with numpy for the early chapters' figures (no downloads), and
its stand-in for a backbone's features.

The scene has a soft background and a few flat-coloured rectangles and discs. Each
object's colour is one of a few class colours, so "pixels of the same kind" is easy to
see, and its box is known exactly. (The detector's training data is ``ddetr.data``'s
synthetic dataset; this is one picture to look at.)
"""
import numpy as np
import torch
import torch.nn.functional as F


CLASS_COLOURS = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.65, 0.25),
    "blue": (0.15, 0.30, 0.85),
    "yellow": (0.95, 0.80, 0.15),
}


def synthetic_scene(size=128, seed=0, objects=None):
    """Draw a scene.

    Args:
        size: the image is size x size pixels.
        seed: the background texture's random seed.
        objects: list of (shape, colour name, (x0, y0, x1, y1) in [0, 1]) with shape
            "rect" or "disc"; None for the default scene of five objects.

    Returns:
        image (size, size, 3) float32 numpy in [0, 1]; boxes (n, 4) float32 numpy,
        (x0, y0, x1, y1) in pixels; labels: list of colour names.
    """
    if objects is None:
        objects = [
            ("rect", "red", (0.08, 0.10, 0.38, 0.35)),
            ("disc", "blue", (0.55, 0.08, 0.90, 0.43)),
            ("rect", "green", (0.12, 0.58, 0.32, 0.92)),
            ("disc", "red", (0.62, 0.60, 0.82, 0.80)),
            ("rect", "yellow", (0.40, 0.45, 0.56, 0.62)),
        ]
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    image = np.empty((size, size, 3), np.float32)
    image[...] = 0.80 + 0.08 * (xs / size)[..., None] - 0.05 * (ys / size)[..., None]
    image += rng.normal(0, 0.015, image.shape).astype(np.float32)
    boxes, labels = [], []
    for shape, colour, (x0, y0, x1, y1) in objects:
        if colour not in CLASS_COLOURS:
            raise ValueError(f"colour must be one of {sorted(CLASS_COLOURS)}, got {colour!r}")
        px0, py0, px1, py1 = x0 * size, y0 * size, x1 * size, y1 * size
        if shape == "rect":
            inside = (xs >= px0) & (xs < px1) & (ys >= py0) & (ys < py1)
        elif shape == "disc":
            cx, cy = (px0 + px1) / 2, (py0 + py1) / 2
            rx, ry = (px1 - px0) / 2, (py1 - py0) / 2
            inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
        else:
            raise ValueError(f"shape must be 'rect' or 'disc', got {shape!r}")
        image[inside] = CLASS_COLOURS[colour]
        boxes.append((px0, py0, px1, py1))
        labels.append(colour)
    return np.clip(image, 0, 1), np.asarray(boxes, np.float32), labels


def pixel_features(image, stride=8):
    """Average-pool an image into a feature map: (H, W, 3) numpy -> (H/s, W/s, 3) tensor.

    A stand-in for a backbone's output: each feature is the mean colour of an s x s
    patch, so features of the same object are similar and we can see what attention
    does with them.
    """
    x = torch.as_tensor(image).permute(2, 0, 1)[None]  # (1, 3, H, W)
    return F.avg_pool2d(x, stride)[0].permute(1, 2, 0).contiguous()
