"""Pictures of the training-only queries (ddetr.models.denoising, hybrid_matching): the
noised copies of an image's boxes, group by group, the decoder's self-attention mask
over all query sets, and recorded recipe runs."""
import matplotlib.pyplot as plt
import numpy as np

from .boxes import draw_cxcywh


def plot_noised_boxes(image, boxes, noised, groups, size, ax=None):
    """The ground-truth boxes (white) and their noised copies (one colour per group,
    dashed), on the image.

    Args:
        image: (H, W, 3) array or PIL image, of side `size` pixels.
        boxes: (T, 4) (cx, cy, w, h) in [0, 1]. noised: (G*T, 4), group g in rows
            g*T .. g*T + T - 1 (DenoisingQueries.boxes of one image, unpadded).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(3.6, 3.6))
    ax.imshow(image)
    colours = plt.get_cmap("tab10")(np.arange(groups) % 10)
    T = len(boxes)
    for g in range(groups):
        for box in noised[g * T:(g + 1) * T]:
            draw_cxcywh(ax, box, size, colours[g], linestyle="--", linewidth=1.2)
    for box in boxes:
        draw_cxcywh(ax, box, size, "white", linewidth=2.0)
    ax.set_axis_off()
    return ax


def plot_query_mask(mask, parts, ax=None):
    """A decoder self-attention mask (Lall, Lall): row = the query that looks, column =
    the query it would look at; dark = blocked. parts: [(label, count), ...] of the
    query sets in order (e.g. denoising groups, "one-to-one", "one-to-many"), whose
    edges are drawn and labelled."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.imshow(np.asarray(mask), cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest")
    edges = np.cumsum([n for _, n in parts])
    for edge in edges[:-1]:
        ax.axhline(edge - 0.5, color="tab:red", lw=1)
        ax.axvline(edge - 0.5, color="tab:red", lw=1)
    ticks = [e - n / 2 - 0.5 for e, (_, n) in zip(edges, parts)]
    labels = [label for label, _ in parts]
    ax.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_xlabel("is looked at")
    ax.set_ylabel("looks")
    return ax


def plot_recipe_runs(rows, metric="AP", ax=None):
    """AP against images seen for recorded runs, one line per run (train_record's
    recipe_runs records: their "evals" and "images_seen"): the colour is the recipe,
    the line style the seed; the legend, one entry per recipe, stands beside the axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.4))
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))       # in recorded order
    palette = plt.get_cmap("tab10" if len(recipes) <= 10 else "tab20")   # one colour each
    colours = dict(zip(recipes, palette(np.arange(len(recipes)))))
    seeds = sorted({r["seed"] for r in rows})
    styles = dict(zip(seeds, ["-", "--", ":", "-."] * len(seeds)))
    for r in rows:
        per_epoch = r["images_seen"] / r["epochs"]
        x = [e["epoch"] * per_epoch for e in r["evals"]]
        ax.plot(x, [e[metric] for e in r["evals"]], marker="o", color=colours[r["recipe"]],
                linestyle=styles[r["seed"]])
    handles = [plt.Line2D([], [], color=colours[k], marker="o", label=k) for k in recipes]
    handles += [plt.Line2D([], [], color="grey", linestyle=styles[s], label=f"seed {s}")
                for s in seeds]
    ax.set(xlabel="training images seen", ylabel=metric)
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return ax
