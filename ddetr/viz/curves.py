"""Cost against size on log-log axes, with fitted slopes in the legend."""
import matplotlib.pyplot as plt
import numpy as np

from ..analysis.measure import fit_loglog_slope


def plot_loglog(x, series, ax=None, xlabel="pixels HW", ylabel="", title=None,
                fit_from=0):
    """Plot each (label -> y values) series against x on log-log axes.

    The legend shows each series' least-squares slope, fitted on the points from
    index ``fit_from`` on (the large sizes, where the leading term dominates).
    Returns (axes, {label: slope}).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.4))
    x = np.asarray(x, dtype=float)
    slopes = {}
    for label, y in series.items():
        y = np.asarray(y, dtype=float)
        slope, _ = fit_loglog_slope(x[fit_from:], y[fit_from:])
        slopes[label] = slope
        ax.loglog(x, y, "o-", markersize=4, label=f"{label} (slope {slope:.2f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return ax, slopes


def plot_kernel_benchmark(result, title=None, ax=None):
    """Bar chart of one ``kernels_<device>.json`` result of ``python -m ddetr bench``:
    forward and forward+backward milliseconds of the reference and the fused kernel,
    per shape, on a log scale. Returns the axes."""
    shapes = list(result["shapes"])
    if ax is None:
        _, ax = plt.subplots(figsize=(1.9 * len(shapes) + 2.5, 3.2))
    bars = [("reference", "forward_ms", "tab:blue", "reference fwd"),
            ("reference", "forward_backward_ms", "lightsteelblue", "reference fwd+bwd"),
            ("kernel", "forward_ms", "tab:orange", "fused fwd"),
            ("kernel", "forward_backward_ms", "navajowhite", "fused fwd+bwd")]
    width = 0.2
    for j, (impl, key, colour, label) in enumerate(bars):
        values = [result["shapes"][s]["impls"][impl][key] for s in shapes]
        ax.bar(np.arange(len(shapes)) + (j - 1.5) * width, values, width, color=colour,
               label=label, edgecolor="black", linewidth=0.4)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(shapes)))
    ax.set_xticklabels(shapes)
    ax.set_ylabel("milliseconds")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    return ax
