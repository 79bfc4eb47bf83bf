"""A trained model's decoder drawn on its image (chapter 6), from
``ddetr.experiments.probes.decoder_trace``:

    plot_refinement / animate_refinement   a few queries through the decoder layers:
        the reference box each layer sampled around (dashed, its centre a star), the
        points it sampled, and the box it predicted (solid), which the next layer
        starts from
    animate_two_stage   all queries: the encoder's top-k proposals (overlapping: no
        NMS), each decoder layer's boxes, then the detections above a threshold
    explore_sampling    a slider view: one frame per query (or encoder position), its
        sampling points on every level, heads in colours, area ~ attention weight

Boxes come as (cx, cy, w, h) in [0, 1] and are drawn in the image's pixels.
"""
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from .animation import animate
from .attention import sampling_points_on_axes
from .boxes import draw_cxcywh

QUERY_COLOURS = plt.get_cmap("tab10")(np.arange(10))


def _image_axes(ax, image, title=None):
    ax.clear()
    ax.imshow(image)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)


def _draw_layer(ax, image, trace, layer, queries, points=True):
    """Layer ``layer`` of the chosen queries on ax (see the module docstring)."""
    H, W = image.shape[:2]
    rec = trace["sampling"][layer]
    for i, q in enumerate(queries):
        colour = QUERY_COLOURS[i % 10]
        ref = trace["references"][layer, q]
        if ref.shape[-1] == 4:
            draw_cxcywh(ax, ref, (W, H), colour, linestyle="--", linewidth=1.0)
        if points:
            loc = rec["sampling_locations"][q].reshape(-1, 2)
            wt = rec["attention_weights"][q].reshape(-1)
            ax.scatter(loc[:, 0] * W, loc[:, 1] * H, s=120 * wt / wt.max() + 1,
                       color=colour, alpha=0.6, edgecolors="none", zorder=3)
        ax.scatter([float(ref[0]) * W], [float(ref[1]) * H], marker="*", s=90,
                   color=colour, edgecolors="white", linewidths=0.8, zorder=4)
        draw_cxcywh(ax, trace["boxes"][layer, q], (W, H), colour)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)


def plot_refinement(image, trace, queries, panel_size=2.6):
    """One panel per decoder layer: for each query in queries, the reference it used
    (dashed box, star at its centre), its sampling points (area ~ weight) and the box
    it predicted (solid). Returns the Figure."""
    image = np.asarray(image)
    D = trace["boxes"].shape[0]
    fig, axes = plt.subplots(1, D, figsize=(panel_size * D, panel_size), squeeze=False)
    for d, ax in enumerate(axes[0]):
        _image_axes(ax, image, f"decoder layer {d + 1}")
        _draw_layer(ax, image, trace, d, queries)
    fig.tight_layout()
    return fig


def animate_refinement(image, trace, queries, size=3.6, interval=900):
    """``plot_refinement`` as an animation, one frame per decoder layer."""
    image = np.asarray(image)
    D = trace["boxes"].shape[0]
    fig, ax = plt.subplots(figsize=(size, size))

    def draw(d):
        _image_axes(ax, image, f"decoder layer {d + 1} of {D}: reference (dashed, star) "
                               f"-> box (solid)")
        _draw_layer(ax, image, trace, d, queries)
    draw(0)
    fig.tight_layout()
    return animate(fig, draw, D, interval=interval, frame_format="jpeg")


def _draw_boxes_scored(ax, image, boxes, scores, colour, labels=None):
    H, W = image.shape[:2]
    for i, (box, score) in enumerate(zip(boxes, scores)):
        draw_cxcywh(ax, box, (W, H), colour, linewidth=1.2, alpha=float(0.15 + 0.85 * score))
        if labels is not None:
            cx, cy, w, h = (float(v) for v in box)
            ax.text((cx - w / 2) * W, (cy - h / 2) * H - 1, f"{labels[i]} {score:.2f}",
                    fontsize=6, color="black", va="bottom",
                    bbox=dict(facecolor=colour, alpha=0.7, pad=1, edgecolor="none"))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)


def animate_two_stage(image, trace, threshold=0.3, categories=None, size=3.6,
                      interval=1100):
    """The two-stage model on one image: the encoder's proposals (frame 0: the top-k,
    outlines darker for a higher proposal score), the boxes after each decoder layer
    (darker for a higher class score), and the detections scoring at least threshold
    (last frame, with class and score). Needs a two-stage trace."""
    if trace["proposal_scores"] is None:
        raise ValueError("animate_two_stage needs the trace of a two-stage model "
                         "(its proposal_scores are None)")
    image = np.asarray(image)
    D = trace["boxes"].shape[0]
    fig, ax = plt.subplots(figsize=(size, size))
    Lq = trace["boxes"].shape[1]

    def draw(i):
        if i == 0:
            _image_axes(ax, image, f"encoder: top {Lq} proposals, no NMS")
            _draw_boxes_scored(ax, image, trace["references"][0], trace["proposal_scores"],
                               "tab:orange")
        elif i <= D:
            _image_axes(ax, image, f"after decoder layer {i} of {D}")
            _draw_boxes_scored(ax, image, trace["boxes"][i - 1], trace["scores"][i - 1],
                               "tab:blue")
        else:
            keep = trace["scores"][-1] >= threshold
            names = [(categories or {}).get(int(c), str(int(c)))
                     for c in trace["labels"][-1][keep]]
            _image_axes(ax, image, f"detections: score >= {threshold}")
            _draw_boxes_scored(ax, image, trace["boxes"][-1][keep],
                               trace["scores"][-1][keep], "yellow", names)
    draw(0)
    fig.tight_layout()
    return animate(fig, draw, D + 2, interval=interval, frame_format="jpeg")


def level_images(image, spatial_shapes):
    """The image resampled to each level's grid: L arrays (H_l, W_l, 3) in [0, 1]."""
    pil = Image.fromarray(np.asarray(image))
    return [np.asarray(pil.resize((int(w), int(h)), Image.BILINEAR)) / 255.0
            for h, w in spatial_shapes.tolist()]


def query_frames(trace, queries, categories=None, layer=-1):
    """Frames for ``explore_sampling``: decoder queries of one layer (default the last),
    with the box each predicts and its score."""
    D = trace["boxes"].shape[0]
    d = layer % D
    rec = trace["sampling"][d]
    frames = []
    for q in queries:
        label = int(trace["labels"][d, q])
        name = (categories or {}).get(label, str(label))
        frames.append({"reference": rec["reference_points"][q, 0, :2],
                       "locations": rec["sampling_locations"][q],
                       "weights": rec["attention_weights"][q], "box": trace["boxes"][d, q],
                       "title": f"query {q} (layer {d + 1}): {name} "
                                f"{float(trace['scores'][d, q]):.2f}"})
    return frames


def position_frames(record, tokens):
    """Frames for ``explore_sampling``: encoder queries (image positions), given as token
    indices into the record of an encoder layer."""
    starts = np.cumsum([0] + [int(h * w) for h, w in record["spatial_shapes"].tolist()])
    frames = []
    for t in tokens:
        lvl = int(np.searchsorted(starts, t, side="right") - 1)
        x, y = record["reference_points"][t, lvl].tolist()
        frames.append({"reference": record["reference_points"][t, lvl],
                       "locations": record["sampling_locations"][t],
                       "weights": record["attention_weights"][t], "box": None,
                       "title": f"encoder token {t}: level {lvl}, at ({x:.2f}, {y:.2f})"})
    return frames


def explore_sampling(image, spatial_shapes, frames, panel_size=2.0, interval=1200):
    """A slider view: each frame one query, its box on the image (left) and its
    sampling points on every level (heads in colours, area ~ weight, one scale per
    frame). frames: from ``query_frames`` / ``position_frames``."""
    image = np.asarray(image)
    levels = level_images(image, spatial_shapes)
    L = len(levels)
    fig, axes = plt.subplots(1, L + 1, figsize=(panel_size * (L + 1), panel_size + 0.35))
    H, W = image.shape[:2]

    def draw(i):
        f = frames[i]
        _image_axes(axes[0], image, "image")
        if f["box"] is not None:
            draw_cxcywh(axes[0], f["box"], (W, H), "yellow", linewidth=1.5)
        rx, ry = (float(v) for v in f["reference"])
        axes[0].scatter([rx * W], [ry * H], marker="*", s=120, color="black",
                        edgecolors="white", zorder=4)
        wmax = float(torch.as_tensor(f["weights"]).max())
        for lvl, ax in enumerate(axes[1:]):
            ax.clear()
            h, w = levels[lvl].shape[:2]
            ax.imshow(levels[lvl], extent=(0, w, h, 0), interpolation="nearest")
            sampling_points_on_axes(ax, f["reference"], f["locations"][:, lvl],
                                    f["weights"][:, lvl], (w, h), legend=False,
                                    weight_scale=wmax, max_marker=110)
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"level {lvl} ({h}x{w})", fontsize=8)
        fig.suptitle(f["title"], fontsize=9)
    draw(0)
    fig.tight_layout()
    return animate(fig, draw, len(frames), interval=interval, frame_format="jpeg")
