"""Figures of the convergence experiment (``python -m ddetr experiment convergence``):
AP curves against epochs and wall time with the spread over seeds, AP by object size,
and the sampling spread of a trained model against the size of its boxes.

Every function takes the recorded results (``ddetr.experiments.results.load_results``)
or arrays computed from a model (``ddetr.experiments.probes``), and returns the
matplotlib Figure (or Axes it drew on). The statistics behind the figures live with
the results (``ddetr.experiments.results``); the models and their labels come from
the results too.
"""
import matplotlib.pyplot as plt
import numpy as np

from ..experiments.results import eval_curves, loss_curves, models_of, spearman


def model_colours(models):
    """{model name: colour}: matplotlib's tab10 colours in the order of ``models``. Pass
    every model of the result (``models_of(result)``) so that a model keeps its
    colour in figures of a subset."""
    cycle = plt.get_cmap("tab10").colors
    return {model: cycle[i % len(cycle)] for i, model in enumerate(models)}


def plot_convergence_curve(result, metric="AP", x="epoch", ax=None, models=None,
                           percent=True, colours=None):
    """metric against x ("epoch", "step", "wall_s" or "cpu_s") for each model (default:
    all of the result's): the mean over seeds as a line, the min-max over seeds as a
    band, each seed as faint dots. colours: {model: colour}, default model_colours."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 3.4))
    scale = 100.0 if percent else 1.0
    names = models or models_of(result)
    colours = colours or model_colours(models_of(result))
    labels = {r["model"]: r["label"] for r in result["runs"]}
    for model in names:
        if model not in labels:
            continue
        xs, ys = eval_curves(result, model, metric, x)
        colour = colours.get(model)
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


def plot_size_breakdown(rows, metrics=("APs", "APm", "APl"), ax=None, colours=None):
    """Grouped bars of AP by object size for the rows of
    ``ddetr.experiments.results.summary_table`` (mean over seeds; the error bars span
    min-max). colours: {model: colour}, default model_colours of the rows' models."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    colours = colours or model_colours([row["model"] for row in rows])
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(metrics))
    for i, row in enumerate(rows):
        mean = np.array([row[m] for m in metrics]) * 100
        low = mean - np.array([row[m + "_min"] for m in metrics]) * 100
        high = np.array([row[m + "_max"] for m in metrics]) * 100 - mean
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, mean, width, yerr=[low, high],
               capsize=3, color=colours.get(row["model"]),
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


def plot_loss_curves(result, models=None, ax=None, x="epoch", colours=None):
    """The training loss (mean per 10 steps) of each model (default: all of the
    result's) against epochs (or "step"): the mean over seeds as a line, the min-max
    over seeds as a band. colours: {model: colour}, default model_colours."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 3.4))
    colours = colours or model_colours(models_of(result))
    labels = {r["model"]: r["label"] for r in result["runs"]}
    for model in models or models_of(result):
        xs, ys = loss_curves(result, model, x)
        if xs is None:
            continue
        colour = colours.get(model)
        ax.plot(xs, ys.mean(0), color=colour, linewidth=1.2, label=labels[model])
        if len(ys) > 1:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("epochs (passes over the training set)" if x == "epoch"
                  else "optimizer steps")
    ax.set_ylabel("training loss (mean of 10 steps)")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return ax
