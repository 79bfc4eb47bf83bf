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
