"""Figures of the convergence experiment (``python -m ddetr experiment convergence``):
AP curves against epochs and wall time with the spread over seeds, AP by object size,
and the sampling spread of a trained model against the size of its boxes.

Every function takes the recorded results (``ddetr.experiment.load_results``) or
arrays computed from a model, and returns the matplotlib Figure (or Axes it drew on).
"""
import matplotlib.pyplot as plt
import numpy as np

COLOURS = {"detr": "tab:gray", "deformable_single_scale": "tab:orange",
           "deformable_multi_scale": "tab:blue", "deformable_refine": "tab:green",
           "deformable_dab": "tab:purple"}


def _curves(result, model, metric, x):
    """The runs of one model as arrays: xs (seeds, evals), ys (seeds, evals), truncated
    to the evaluations every seed has."""
    runs = [r for r in result["runs"] if r["model"] == model]
    n = min(len(r["evals"]) for r in runs)
    xs = np.array([[e[x] for e in r["evals"][:n]] for r in runs], dtype=float)
    ys = np.array([[e[metric] for e in r["evals"][:n]] for r in runs], dtype=float)
    return xs, ys


def plot_convergence_curve(result, metric="AP", x="epoch", ax=None, models=None,
                           percent=True):
    """metric against x ("epoch", "step", "wall_s" or "cpu_s") for each model: the mean over
    seeds as a line, the min-max over seeds as a band, each seed as faint dots."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 3.4))
    scale = 100.0 if percent else 1.0
    names = models or list(dict.fromkeys(r["model"] for r in result["runs"]))
    labels = {r["model"]: r["label"] for r in result["runs"]}
    for model in names:
        if model not in labels:
            continue
        xs, ys = _curves(result, model, metric, x)
        colour = COLOURS.get(model)
        mean_x, mean_y = xs.mean(0), ys.mean(0) * scale
        ax.plot(mean_x, mean_y, "o-", color=colour, markersize=3,
                label=f"{labels[model]} ({len(ys)} seed{'s' if len(ys) > 1 else ''})")
        if len(ys) > 1:
            ax.fill_between(mean_x, ys.min(0) * scale, ys.max(0) * scale, color=colour,
                            alpha=0.2, linewidth=0)
        ax.scatter(xs.ravel(), ys.ravel() * scale, s=6, color=colour, alpha=0.4)
    ax.set_xlabel({"epoch": "epochs (passes over the training set)",
                   "step": "optimizer steps",
                   "wall_s": "training wall time on this CPU (s)",
                   "cpu_s": "training CPU time, one core (s)"}.get(x, x))
    ax.set_ylabel(f"{metric} (%)" if percent else metric)
    ax.grid(True, alpha=0.3)
    return ax


def plot_convergence(result, metric="AP", models=None, time="cpu_s"):
    """The paper's convergence figure in miniature: metric against epochs (left) and
    against training time (right; "cpu_s" or "wall_s")."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    plot_convergence_curve(result, metric, "epoch", axes[0], models)
    plot_convergence_curve(result, metric, time, axes[1], models)
    axes[0].set_title(f"{metric} against epochs", fontsize=10)
    axes[1].set_title(f"{metric} against training time", fontsize=10)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    return fig


def plot_size_breakdown(rows, metrics=("APs", "APm", "APl"), ax=None):
    """Grouped bars of AP by object size for the rows of
    ``ddetr.experiment.summary_table`` (mean over seeds; the error bars span min-max)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(metrics))
    for i, row in enumerate(rows):
        mean = np.array([row[m] for m in metrics]) * 100
        low = mean - np.array([row[m + "_min"] for m in metrics]) * 100
        high = np.array([row[m + "_max"] for m in metrics]) * 100 - mean
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, mean, width, yerr=[low, high],
               capsize=3, color=COLOURS.get(row["model"]),
               label=f"{row['label']} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})")
    ax.set_xticks(x, [f"{m}\n({s})" for m, s in zip(metrics, ("small", "medium", "large"))])
    ax.set_ylabel("AP (%)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return ax


def plot_spread_vs_size(box_sizes, spreads, levels_spread=None, ax=None):
    """Scatter of each detection's sampling spread against the size of its box.

    Args:
        box_sizes: (P,) sqrt(w * h) of each predicted box, in pixels.
        spreads: (P,) its attention-weighted mean distance of the sampling points from
            the reference point, in pixels.
        levels_spread: optional (P, L) the same per level (drawn as faint dots).
    Returns:
        the Axes; the title gives the rank correlation (Spearman) of the two.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 3.6))
    box_sizes, spreads = np.asarray(box_sizes, float), np.asarray(spreads, float)
    if levels_spread is not None:
        levels_spread = np.asarray(levels_spread, float)
        cmap = plt.get_cmap("viridis")
        for lvl in range(levels_spread.shape[1]):
            ax.scatter(box_sizes, levels_spread[:, lvl], s=4, alpha=0.25,
                       color=cmap(lvl / max(levels_spread.shape[1] - 1, 1)),
                       label=f"level {lvl}")
    ax.scatter(box_sizes, spreads, s=10, color="black", alpha=0.7, label="all levels")
    lim = max(box_sizes.max(initial=1), spreads.max(initial=1)) * 1.05
    ax.plot([0, lim], [0, lim / 2], "--", color="grey", linewidth=0.8,
            label="half the box size")
    ax.set_xlabel("box size sqrt(w h) (pixels)")
    ax.set_ylabel("sampling spread (pixels)")
    ax.set_title(f"Spearman rank correlation {spearman(box_sizes, spreads):.2f} "
                 f"({len(box_sizes)} detections)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, markerscale=2)
    return ax


def spearman(a, b):
    """Spearman's rank correlation of two 1-d arrays (ties broken by order)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def plot_loss_curves(result, models=None, ax=None, x="epoch"):
    """The training loss (mean per 10 steps) of each model against epochs (or "step"):
    the mean over seeds as a line, the min-max over seeds as a band."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 3.4))
    names = models or list(dict.fromkeys(r["model"] for r in result["runs"]))
    per_epoch = result["settings"]["batch_size"] / result["settings"]["train_images"]
    for model in names:
        runs = [r for r in result["runs"] if r["model"] == model and r.get("loss")]
        if not runs:
            continue
        n = min(len(r["loss"]["loss"]) for r in runs)
        steps = np.array(runs[0]["loss"]["step"][:n], dtype=float)
        xs = steps * per_epoch if x == "epoch" else steps
        ys = np.array([r["loss"]["loss"][:n] for r in runs])
        colour = COLOURS.get(model)
        ax.plot(xs, ys.mean(0), color=colour, linewidth=1.2, label=runs[0]["label"])
        if len(ys) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("epochs (passes over the training set)" if x == "epoch"
                  else "optimizer steps")
    ax.set_ylabel("training loss (mean of 10 steps)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return ax
