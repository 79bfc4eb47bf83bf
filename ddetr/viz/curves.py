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


def plot_focal_loss(alpha, gamma, ax=None):
    """Focal loss against binary cross-entropy, as functions of the predicted
    probability p, for a target of 1 and of 0 (torchvision's ``sigmoid_focal_loss``
    with the given alpha and gamma). Returns the axes."""
    import torch
    from torchvision.ops import sigmoid_focal_loss

    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.2))
    p = torch.linspace(0.002, 0.998, 400, dtype=torch.float64)
    for target, colour in ((1.0, "tab:green"), (0.0, "tab:red")):
        y = torch.full_like(p, target)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(p.logit(), y, reduction="none")
        fl = sigmoid_focal_loss(p.logit(), y, alpha=alpha, gamma=gamma, reduction="none")
        ax.plot(p, bce, color=colour, linestyle="--", label=f"cross-entropy, target {target:.0f}")
        ax.plot(p, fl, color=colour, label=f"focal, target {target:.0f}")
    ax.set_yscale("log")
    ax.set_ylim(1e-5, 10)
    ax.set_xlabel("predicted probability p")
    ax.set_ylabel("loss (log scale)")
    ax.set_title(f"focal loss (alpha {alpha}, gamma {gamma}) against cross-entropy", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return ax


def plot_cost_terms(pixels, terms, crossings=(), ax=None, title=None):
    """FLOP terms of an attention layer against the pixels HW, on log-log axes.

    Args:
        pixels: (P,) HW values; terms: {label: (P,) FLOPs}; crossings: (label, HW)
            pairs, drawn as dotted vertical lines where one term overtakes another.
    Returns the axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.6, 3.3))
    for label, flops in terms.items():
        ax.loglog(pixels, flops, label=label, linewidth=1.5)
    for label, hw in crossings:
        ax.axvline(hw, color="grey", linestyle=":", linewidth=1)
        ax.annotate(label, (hw, ax.get_ylim()[0]), xytext=(3, 6), textcoords="offset points",
                    fontsize=7, rotation=90, va="bottom")
    ax.set_xlabel("pixels HW")
    ax.set_ylabel("FLOPs")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return ax
