"""Figures and animations of the toy trainings of ``ddetr.experiments.toy_attention``
(chapters 3 and 4): where the queries look before, during and after training.

A scene is drawn from its class channels (each class in its colour of
``toy_scene.CLASS_COLOURS``, on grey); each query has its own colour: its reference
point is a star, its sampled points are dots with area proportional to their
attention weight (one scale for the whole figure), its object's box a thin outline.
"""
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.patches import Rectangle

from .animation import animate
from .toy_scene import CLASS_COLOURS

QUERY_COLOURS = ("black", "darkviolet", "darkorange", "deeppink")
LEVEL_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def toy_image(signal, stride=1):
    """(classes, H, W) class channels -> (H / stride, W / stride, 3) RGB in [0, 1]."""
    signal = torch.as_tensor(signal)[None].float()
    if stride > 1:
        signal = F.avg_pool2d(signal, stride)
    s = signal[0].clamp(0, 1).numpy()
    colours = np.array(list(CLASS_COLOURS.values())[:s.shape[0]])     # (classes, 3)
    grey = np.full(3, 0.86)
    image = grey + np.einsum("chw,cd->hwd", s, colours - grey)
    return image.clip(0, 1)


def _points(ax, locations, weights, extent, colour, scale, max_marker=90):
    """locations (..., 2) in [0, 1], weights (...) -> dots on ax (artists returned)."""
    w, h = extent
    loc = np.asarray(locations).reshape(-1, 2)
    wt = np.asarray(weights).reshape(-1)
    return ax.scatter(loc[:, 0] * w, loc[:, 1] * h, s=max_marker * wt / scale + 2,
                      color=colour, edgecolors="white", linewidths=0.5, zorder=3)


def _draw_queries(ax, scenes, n, snap, scale, extent, level=None):
    """The queries of scene n (their box, reference star and points) on ax."""
    size = scenes["signal"].shape[-1]
    w, h = extent
    for q in range(scenes["query"].shape[1]):
        colour = QUERY_COLOURS[q % len(QUERY_COLOURS)]
        x0, y0, x1, y1 = (scenes["boxes"][n, q] * w / size).tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linewidth=0.8, linestyle="--"))
        loc, wt = snap["locations"][n, q], snap["weights"][n, q]
        if level is not None:
            loc, wt = loc[:, level], wt[:, level]
        _points(ax, loc, wt, extent, colour, scale)
        rx, ry = scenes["reference"][n, q].tolist()
        ax.scatter([rx * w], [ry * h], marker="*", s=110, color=colour,
                   edgecolors="white", linewidths=0.8, zorder=4)


def _scene_axes(ax, image, title=None):
    h, w = image.shape[:2]
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest")
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def _smooth(values, window=10):
    v = np.asarray(values, float)
    if len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def plot_toy_sampling(scenes, history, scene=0, steps=None, panel_size=2.6):
    """The queries of one display scene at a few snapshots of training (default: the
    first and the last), one panel each. Returns the Figure."""
    snaps = history["snapshots"]
    chosen = [snaps[0], snaps[-1]] if steps is None else \
        [next(s for s in snaps if s["step"] >= step) for step in steps]
    scale = max(float(s["weights"][scene].max()) for s in chosen)
    image = toy_image(scenes["signal"][scene])
    fig, axes = plt.subplots(1, len(chosen), figsize=(panel_size * len(chosen), panel_size),
                             squeeze=False)
    for ax, snap in zip(axes[0], chosen):
        _scene_axes(ax, image, f"step {snap['step']}")
        _draw_queries(ax, scenes, scene, snap, scale, image.shape[1::-1])
    fig.tight_layout()
    return fig


def animate_toy_training(scenes, history, scene=0, size=(5.6, 2.6), interval=350):
    """An animation of training: the display scene's queries at every snapshot (left)
    and the training loss with the current step marked (right)."""
    snaps = history["snapshots"]
    scale = max(float(s["weights"][scene].max()) for s in snaps)
    image = toy_image(scenes["signal"][scene])
    fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=size,
                                      gridspec_kw={"width_ratios": [1, 1.15]})
    loss = _smooth(history["loss"])
    ax_loss.plot(np.arange(len(loss)) + (len(history["loss"]) - len(loss)), loss,
                 color="tab:blue", linewidth=1)
    ax_loss.set_xlabel("training step", fontsize=8)
    ax_loss.set_ylabel("loss (running mean of 10)", fontsize=8)
    ax_loss.tick_params(labelsize=7)
    marker = ax_loss.axvline(0, color="tab:red", linewidth=1)
    fig.tight_layout()

    def draw(i):
        ax.clear()
        _scene_axes(ax, image, f"step {snaps[i]['step']}")
        _draw_queries(ax, scenes, scene, snaps[i], scale, image.shape[1::-1])
        marker.set_xdata([snaps[i]["step"]] * 2)
    return animate(fig, draw, len(snaps), interval=interval)


def plot_toy_losses(histories, ax=None, window=10):
    """Training loss against step for several runs ({label: history}); returns ax."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 2.8))
    for label, history in histories.items():
        loss = _smooth(history["loss"], window)
        ax.plot(np.arange(len(loss)) + window - 1, loss, label=label, linewidth=1.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"loss (running mean of {window})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_dense_attention(scenes, history, scene=0, query=0, panel_size=2.6):
    """Dense attention of one query (mean over heads) at the first and last snapshot,
    over the scene. Returns the Figure."""
    snaps = history["snapshots"]
    H = W = scenes["signal"].shape[-1]
    image = toy_image(scenes["signal"][scene])
    colour = QUERY_COLOURS[query % len(QUERY_COLOURS)]
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel_size + 0.6, panel_size))
    for ax, snap in zip(axes, (snaps[0], snaps[-1])):
        weights = snap["attention"][scene, :, query].mean(0).view(H, W).numpy()
        _scene_axes(ax, image, f"step {snap['step']}: weight x HW, mean of heads")
        im = ax.imshow(weights * H * W, cmap="magma", alpha=0.75, extent=(0, W, H, 0),
                       interpolation="nearest")
        x0, y0, x1, y1 = scenes["boxes"][scene, query].tolist()
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linewidth=1.0, linestyle="--"))
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def _level_images(scenes, scene):
    shapes = scenes["spatial_shapes"].tolist()
    size = scenes["signal"].shape[-1]
    return [toy_image(scenes["signal"][scene], size // w) for h, w in shapes]


def plot_toy_levels(scenes, history, scene=0, snapshot=-1, panel_size=2.3):
    """The multi-scale toy: one panel per level, both queries of a display scene (small
    object: first colour, large: second) at one snapshot. Returns the Figure."""
    snap = history["snapshots"][snapshot]
    images = _level_images(scenes, scene)
    scale = float(snap["weights"][scene].max())
    fig, axes = plt.subplots(1, len(images), figsize=(panel_size * len(images), panel_size))
    for lvl, (ax, image) in enumerate(zip(axes, images)):
        h, w = image.shape[:2]
        _scene_axes(ax, image, f"step {snap['step']}, level {lvl} ({h}x{w})")
        _draw_queries(ax, scenes, scene, snap, scale, (w, h), level=lvl)
    fig.tight_layout()
    return fig


def animate_toy_levels(scenes, history, scene=0, panel_size=1.9, interval=350):
    """The multi-scale toy over training: one panel per level, both queries."""
    snaps = history["snapshots"]
    images = _level_images(scenes, scene)
    scale = max(float(s["weights"][scene].max()) for s in snaps)
    fig, axes = plt.subplots(1, len(images), figsize=(panel_size * len(images),
                                                      panel_size + 0.3))

    def draw(i):
        for lvl, (ax, image) in enumerate(zip(axes, images)):
            ax.clear()
            h, w = image.shape[:2]
            _scene_axes(ax, image, f"level {lvl} ({h}x{w})")
            _draw_queries(ax, scenes, scene, snaps[i], scale, (w, h), level=lvl)
        fig.suptitle(f"training step {snaps[i]['step']}", fontsize=9)
    draw(0)
    fig.tight_layout()
    return animate(fig, draw, len(snaps), interval=interval)


def plot_level_mass(before, after, labels=("small objects", "large objects"), ax=None):
    """Each level's share of the attention weight, before and after training, per
    query kind. before/after: (kinds, L) arrays (``mass_per_level`` averaged over the
    scenes). Returns ax."""
    before, after = np.asarray(before), np.asarray(after)
    kinds, L = after.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(4.8, 2.8))
    width = 0.8 / (2 * kinds)
    for k in range(kinds):
        for j, (values, hatch, when) in enumerate(((before, "//", "init"),
                                                   (after, None, "trained"))):
            x = np.arange(L) + (2 * k + j - kinds + 0.5) * width
            ax.bar(x, values[k], width, color=QUERY_COLOURS[k],
                   alpha=0.4 if j == 0 else 0.9, hatch=hatch, edgecolor="black",
                   linewidth=0.4, label=f"{labels[k]}, {when}")
    ax.set_xticks(np.arange(L))
    ax.set_xticklabels([f"level {lvl}" for lvl in range(L)])
    ax.set_ylabel("share of attention weight")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return ax
