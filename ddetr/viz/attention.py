"""Attention maps and deformable sampling points drawn on an image.

Coordinates follow the library: points (x, y) normalised to [0, 1] of the map, pixel
centres at (j + 0.5) / W. On an image of width W_img a point x lands at x * W_img.
"""
import matplotlib.pyplot as plt
import numpy as np
import torch


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def plot_attention_maps(image, maps, query_points=None, titles=None, ncols=4,
                        alpha=0.6, cmap="magma", panel_size=2.4):
    """Overlay attention maps on an image, one panel per map.

    Args:
        image: (H_img, W_img, 3) numpy in [0, 1].
        maps: (P, h, w) attention weights of P queries over an h x w map (any scale).
        query_points: optional (P, 2) (x, y) in [0, 1] of each query, drawn as a cross.
        titles: optional P strings.

    Returns:
        the matplotlib Figure.
    """
    maps = _np(maps)
    P = maps.shape[0]
    ncols = min(ncols, P)
    nrows = -(-P // ncols)
    Hi, Wi = image.shape[:2]
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= P:
            continue
        ax.imshow(image)
        ax.imshow(maps[i], cmap=cmap, alpha=alpha, extent=(0, Wi, Hi, 0),
                  interpolation="nearest")
        if query_points is not None:
            x, y = _np(query_points)[i]
            ax.plot(x * Wi, y * Hi, marker="x", color="cyan", markersize=9, mew=2.5)
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def sampling_points_on_axes(ax, reference_point, locations, weights, extent,
                            max_marker=220, head_colours=None, legend=True,
                            weight_scale=None):
    """Draw one query's reference point and its sampled points on existing axes.

    Args:
        reference_point: (2,) (x, y) in [0, 1].
        locations: (M, K, 2) sampled points (x, y) in [0, 1], K points per head.
        weights: (M, K) their attention weights; marker area is proportional to weight.
        extent: (width, height) of what the axes show, in its own units (pixels).
        weight_scale: the weight drawn with the largest marker (default: the largest
            of ``weights``); pass a shared value to compare several axes.
    """
    locations, weights = _np(locations), _np(weights)
    M = locations.shape[0]
    width, height = extent
    if head_colours is None:
        head_colours = plt.get_cmap("tab10" if M <= 10 else "tab20")(np.arange(M) % 20)
    wmax = max(float(weights.max() if weight_scale is None else weight_scale), 1e-12)
    for m in range(M):
        ax.scatter(locations[m, :, 0] * width, locations[m, :, 1] * height,
                   s=max_marker * weights[m] / wmax + 4, color=head_colours[m],
                   edgecolors="white", linewidths=0.6, alpha=0.9,
                   label=f"head {m}", zorder=3)
    rx, ry = _np(reference_point)
    ax.scatter([rx * width], [ry * height], marker="*", s=180, color="black",
               edgecolors="white", linewidths=1.0, zorder=4, label="reference")
    if legend:
        ax.legend(fontsize=6, loc="upper right", framealpha=0.8, markerscale=0.5)
    return ax


def plot_sampling_points(image, reference_point, locations, weights, title=None,
                         size=4.2, zoom=None):
    """One query of deformable attention on an image.

    Args:
        image: (H_img, W_img, 3) numpy, or a (h, w) feature map (drawn in grey).
        reference_point: (2,); locations: (M, K, 2); weights: (M, K), as in
            ``DeformableAttention.sampling`` for one batch item and one query.
        zoom: optional half-width, in [0, 1] units, of a window around the reference.

    Returns:
        the matplotlib Figure.
    """
    image = _np(image)
    Hi, Wi = image.shape[:2]
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, extent=(0, Wi, Hi, 0))
    sampling_points_on_axes(ax, reference_point, locations, weights, (Wi, Hi))
    if zoom is not None:
        rx, ry = _np(reference_point)
        ax.set_xlim((rx - zoom) * Wi, (rx + zoom) * Wi)
        ax.set_ylim((ry + zoom) * Hi, (ry - zoom) * Hi)
    else:
        ax.set_xlim(0, Wi)
        ax.set_ylim(Hi, 0)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_level_sampling(level_images, reference_point, locations, weights,
                        titles=None, panel_size=2.8, grid=True):
    """Multi-scale sampling of one query: one panel per level.

    Args:
        level_images: L arrays (h_l, w_l) or (h_l, w_l, 3), each level's map.
        reference_point: (2,) or (L, 2), (x, y) in [0, 1] (per level if given so).
        locations: (M, L, K, 2); weights: (M, L, K), one query of
            ``MSDeformAttn.sampling``. Marker sizes share one scale over all levels,
            so they compare across panels.

    Returns:
        the matplotlib Figure.
    """
    locations, weights = _np(locations), _np(weights)
    ref = _np(reference_point)
    L = len(level_images)
    fig, axes = plt.subplots(1, L, figsize=(panel_size * L, panel_size), squeeze=False)
    wmax = float(weights.max())
    for lvl, ax in enumerate(axes[0]):
        img = _np(level_images[lvl])
        h, w = img.shape[:2]
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, extent=(0, w, h, 0),
                  interpolation="nearest")
        if grid and max(h, w) <= 32:
            ax.set_xticks(np.arange(0, w + 1), minor=True)
            ax.set_yticks(np.arange(0, h + 1), minor=True)
            ax.grid(which="minor", color="white", linewidth=0.3, alpha=0.5)
        r = ref[lvl] if ref.ndim == 2 else ref
        sampling_points_on_axes(ax, r, locations[:, lvl], weights[:, lvl], (w, h),
                                legend=False, weight_scale=wmax)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.tick_params(labelsize=6)
        ax.set_title(titles[lvl] if titles else f"level {lvl} ({h}x{w})", fontsize=8)
    axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       markerscale=0.5, framealpha=0.8)
    fig.tight_layout()
    return fig
