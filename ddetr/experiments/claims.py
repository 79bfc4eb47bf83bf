"""The paper's two claims, tested on a convergence results file (``results.py``).

1. Convergence (Table 1, Fig. 3 of the paper): Deformable DETR reaches early what DETR
   reaches late, or not at all. ``convergence_claim`` compares two models' mean AP
   curves over seeds: the epoch at which the faster one first matches the slower one's
   final AP, and whether the slower one ever matches the faster one's.
2. Small objects (Table 2): multi-scale attention beats single scale on small objects.
   ``scale_claim`` takes the gap in APs at the last common evaluation and sets it
   against the seed spread (the largest max - min over seeds of either model); the
   claim holds here only if the gap is larger than that spread.

Each returns a dict of numbers and a ``verdict``, one sentence written from those
numbers, whichever way they fall; the book prints both.
"""
import numpy as np

from .results import eval_curves, summary_table


def _mean_curve(result, model, metric):
    """(epochs (evals,), mean over seeds (evals,), seeds, max - min over seeds at the
    last evaluation) of one model's metric."""
    xs, ys = eval_curves(result, model, metric, "epoch")
    return xs[0], ys.mean(0), ys.shape[0], float(ys[:, -1].max() - ys[:, -1].min())


def _first_reaching(epochs, curve, target):
    """The first epoch at which curve >= target, or None."""
    hits = np.nonzero(curve >= target - 1e-12)[0]
    return float(epochs[hits[0]]) if len(hits) else None


def convergence_claim(result, fast="deformable_multi_scale", slow="detr", metric="AP",
                      floor=0.01):
    """Does `fast` reach early what `slow` reaches late (or never)? Below `floor` (a
    fraction: 0.01 = 1 point of AP) a final value says too little to call either way.

    Returns {"fast", "slow", "metric", "seeds": (fast seeds, slow seeds),
    "epochs": the last common epoch, "fast_final", "slow_final" (mean over seeds at
    the models' last evaluation), "spread" (the larger max - min over seeds there),
    "fast_reaches_slow_final_at" (the first epoch at which fast's mean curve is at
    least slow's final value, or None), "slow_reaches_fast_final_at" (likewise),
    "epoch_ratio" (slow's epochs / the epoch at which fast got there, or None),
    "holds" (fast got there at fewer epochs, and ends higher by more than the seed
    spread, and at floor or above), "first_eval" (fast's first evaluated epoch: reached
    there, the ratio is only a lower bound), "verdict"}."""
    fx, fy, fn, fspread = _mean_curve(result, fast, metric)
    sx, sy, sn, sspread = _mean_curve(result, slow, metric)
    out = {"fast": fast, "slow": slow, "metric": metric, "seeds": (fn, sn),
           "epochs": float(min(fx[-1], sx[-1])), "spread": max(fspread, sspread),
           "fast_final": float(fy[-1]), "slow_final": float(sy[-1])}
    out["fast_reaches_slow_final_at"] = _first_reaching(fx, fy, sy[-1])
    out["slow_reaches_fast_final_at"] = _first_reaching(sx, sy, fy[-1])
    at = out["fast_reaches_slow_final_at"]
    out["epoch_ratio"] = float(sx[-1] / at) if at else None
    out["holds"] = bool(at is not None and at < sx[-1] and fy[-1] >= floor
                        and fy[-1] - sy[-1] > out["spread"])
    out["first_eval"] = float(fx[0])
    out["verdict"] = _convergence_verdict(result, out, floor)
    return out


def _label(result, model):
    return next(r["label"] for r in result["runs"] if r["model"] == model)


def _convergence_verdict(result, c, floor):
    fast, slow, m = _label(result, c["fast"]), _label(result, c["slow"]), c["metric"]
    finals = (f"after {c['epochs']:.2f} epochs {fast} is at {m} {100 * c['fast_final']:.2f}"
              f" % and {slow} at {100 * c['slow_final']:.2f} % (means over "
              f"{c['seeds'][0]} and {c['seeds'][1]} seeds; seed spread "
              f"{100 * c['spread']:.2f} points)")
    if c["fast_final"] < floor:
        return (f"Not shown: {finals}; both are below {100 * floor:g} % {m}, too early "
                f"in training to tell.")
    at = c["fast_reaches_slow_final_at"]
    bound = (f" ({fast}'s first evaluation: the ratio is a lower bound)"
             if at is not None and at <= c["first_eval"] else "")
    if c["holds"] and c["slow_final"] < floor:
        nothing = (f"{slow} found nothing that COCOeval counts in the whole run" if
                   c["slow_final"] == 0 else f"{slow} stays below {100 * floor:g} % {m} for "
                   f"the whole run")
        return (f"Holds, against a baseline that has not started to detect: {finals}; "
                f"{nothing}. {fast} was past that at epoch {at:.2f}, "
                f"{c['epoch_ratio']:.1f}x fewer epochs{bound}; how many epochs {slow} "
                f"needs to get going, this budget does not show.")
    if c["holds"]:
        later = ("never reached" if c["slow_reaches_fast_final_at"] is None else
                 f"reached only at epoch {c['slow_reaches_fast_final_at']:.2f}")
        return (f"Holds: {finals}; {fast} got to {slow}'s final {m} at epoch "
                f"{at:.2f}, {c['epoch_ratio']:.1f}x fewer epochs{bound}, and its own "
                f"final {m} {slow} {later}.")
    if c["fast_final"] - c["slow_final"] > c["spread"]:
        return (f"Does not hold clearly: {finals}; {fast} ends higher but got to "
                f"{slow}'s final {m} only at the end.")
    if c["fast_final"] > c["slow_final"]:
        return (f"Not shown: {finals}; {fast} ends higher, but by less than the seed "
                f"spread.")
    return f"Does not hold: {finals}; {fast} does not end higher."


def scale_claim(result, single="deformable_single_scale", multi="deformable_multi_scale",
                metric="APs"):
    """Is multi-scale ahead of single scale on `metric` (small objects) by more than
    the seed spread?

    Returns {"metric", "gap" (mean multi - mean single at their last common
    evaluation), "spread" (the largest max - min over seeds of either model), "seeds",
    "single": (mean, min, max), "multi": (mean, min, max), "separated" (multi's worst
    seed above single's best), "holds" (gap > spread), "gaps": {metric: gap} for AP,
    APs, APm, APl, "largest" (the size class of the largest gap), "verdict"}. A metric that is None (no such objects) raises."""
    rows = {r["model"]: r for r in summary_table(result)}
    for model in (single, multi):
        if model not in rows:
            raise ValueError(f"no runs of model {model!r}; the result has {list(rows)}")
    step = min(rows[single]["step"], rows[multi]["step"])
    rows = {r["model"]: r for r in summary_table(result, at_step=step)}
    s, m = rows[single], rows[multi]
    if s[metric] is None or m[metric] is None:
        raise ValueError(f"{metric} was not measured (no such objects in the val set)")
    spread = max(s[metric + "_max"] - s[metric + "_min"], m[metric + "_max"] - m[metric + "_min"])
    out = {"metric": metric, "step": step, "epoch": s["epoch"],
           "seeds": (s["seeds"], m["seeds"]),
           "single": (s[metric], s[metric + "_min"], s[metric + "_max"]),
           "multi": (m[metric], m[metric + "_min"], m[metric + "_max"]),
           "gap": m[metric] - s[metric], "spread": spread,
           "separated": m[metric + "_min"] > s[metric + "_max"],
           "gaps": {k: m[k] - s[k] for k in ("AP", "APs", "APm", "APl")
                    if m[k] is not None and s[k] is not None}}
    out["holds"] = bool(out["gap"] > spread)
    sizes = {k: v for k, v in out["gaps"].items() if k in ("APs", "APm", "APl")}
    out["largest"] = max(sizes, key=sizes.get) if sizes else None   # the class gaining most
    gap, spr = 100 * out["gap"], 100 * spread
    where = (f"at epoch {out['epoch']:.2f}, multi-scale {metric} {100 * out['multi'][0]:.2f} %"
             f" against single scale {100 * out['single'][0]:.2f} % (means over "
             f"{out['seeds'][1]} and {out['seeds'][0]} seeds): a gap of {gap:+.2f} points "
             f"against a seed spread of {spr:.2f}")
    others = ", ".join(f"{k} {100 * v:+.2f}" for k, v in out["gaps"].items() if k != metric)
    if out["largest"] == metric:
        others += f"; the gain is largest on {metric}, as in the paper"
    elif out["largest"] is not None:
        others += (f"; unlike the paper, the gain is largest on {out['largest']}, "
                   f"not on {metric}")
    if out["holds"]:
        out["verdict"] = f"Holds: {where}. The other gaps: {others}."
    elif out["gap"] > 0:
        out["verdict"] = (f"Not shown: {where}; the gap is within the seed noise. "
                          f"The other gaps: {others}.")
    else:
        out["verdict"] = f"Does not hold: {where}. The other gaps: {others}."
    return out
