"""The convergence experiment's results file, and what is computed from it.

``run_convergence`` (``ddetr.experiments.convergence``) writes ``convergence.json`` and
``convergence.md`` into its output folder; the book reads them back with
``load_results`` and summarises them with ``summary_table``, ``eval_curves``,
``loss_curves`` and ``spearman``.

Schema of convergence.json (version "ddetr.convergence/1")::

    {"schema", "command", "commit", "dirty", "machine": {cpu, cpu_cores, torch, ...},
     "date", "quick", "load_average": {"start", "end"},
     "settings": {preset, steps, eval_every, lr_drop, batch_size, train_images,
                  val_images, time_limit_min, start_within_min, jobs, threads, seeds,
                  late_seeds, data_path},
     "data": {"train"|"val": {"small", "medium", "large"}},   # objects per size class
     "runs": [{"model", "label", "seed", "overrides", "params", "steps", "epochs",
               "trained_at": [{"commit", "dirty", "cpu", "torch"}],  # who trained it
               "wall_s", "cpu_s", "total_s", "time_limited",
               "evals": [{"step", "epoch", "wall_s", "cpu_s", "AP", "AP50", "AP75",
                          "APs", "APm", "APl"}],
               "loss": {"step": [...], "loss": [...]},   # mean training loss per 10 steps
               "compact", "compact_AP"}],         # the last two: multi-scale seed 0 only
     "pending": ["<model>/seed<k>", ...],   # runs not finished (or not started in time)
     "failed": [...],                       # only if a run raised
     "wall_total_s",                        # from the start to the last finished run
     "notes": [...],                        # optional: remarks added to a recorded file
     "paper": {...}}                        # the paper's numbers, for the tables

Metrics are COCOeval's, in [0, 1].
"""
import json
from pathlib import Path

import numpy as np

SCHEMA = "ddetr.convergence/1"
METRIC_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def load_results(path):
    """The recorded results of ``path`` (a convergence.json: a dict in the schema above).
    The book passes ``../benchmarks/convergence.json``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results file at {path} (convergence.json written by "
                                f"python -m ddetr experiment convergence)")
    result = json.loads(path.read_text())
    if result.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {result.get('schema')!r}, expected {SCHEMA!r}")
    return result


def write_results(result, out_dir):
    """Write ``convergence.json`` (atomically: a reader never sees half a file) and its
    table ``convergence.md`` into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".convergence.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out_dir / "convergence.json")
    (out_dir / "convergence.md").write_text(markdown_summary(result))


def models_of(result):
    """The model names of the result's runs, in the order they first appear."""
    return list(dict.fromkeys(r["model"] for r in result["runs"]))


def summary_table(result, metrics=METRIC_KEYS, at_step=None):
    """Per model: mean, min and max over seeds of each metric at the final common step
    (or at_step). Returns a list of dicts {"model", "label", "seeds", "step", "epoch",
    "wall_s", metric: mean, metric + "_min", metric + "_max"}; a metric that no seed
    measured (None: no such objects) stays None."""
    by_model = {}
    for run in result["runs"]:
        by_model.setdefault(run["model"], []).append(run)
    rows = []
    for model, runs in by_model.items():
        step = at_step or min(r["evals"][-1]["step"] for r in runs)
        evals = []
        for r in runs:
            matching = [e for e in r["evals"] if e["step"] <= step]
            if matching:
                evals.append(matching[-1])
        if not evals:
            continue
        row = {"model": model, "label": runs[0]["label"], "seeds": len(evals),
               "step": step, "epoch": evals[0]["epoch"],
               "wall_s": sum(e["wall_s"] for e in evals) / len(evals),
               "cpu_s": sum(e.get("cpu_s", float("nan")) for e in evals) / len(evals)}
        for m in metrics:       # None: not measured (COCOeval's -1: no such objects)
            values = [e[m] for e in evals if e[m] is not None]
            row[m] = sum(values) / len(values) if values else None
            row[m + "_min"], row[m + "_max"] = (min(values), max(values)) if values else (None, None)
        rows.append(row)
    return rows


def eval_curves(result, model, metric="AP", x="epoch"):
    """The runs of one model as arrays: xs (seeds, evals) of the evaluation key x
    ("epoch", "step", "wall_s" or "cpu_s") and ys (seeds, evals) of the metric,
    truncated to the evaluations every seed has."""
    runs = [r for r in result["runs"] if r["model"] == model]
    if not runs:
        raise ValueError(f"no runs of model {model!r}; the result has {models_of(result)}")
    n = min(len(r["evals"]) for r in runs)
    xs = np.array([[e[x] for e in r["evals"][:n]] for r in runs], dtype=float)
    ys = np.array([[e[metric] for e in r["evals"][:n]] for r in runs], dtype=float)
    return xs, ys


def loss_curves(result, model, x="epoch"):
    """The training loss (mean per 10 steps) of one model's runs that recorded it:
    xs (windows,) in epochs (or optimizer steps for x="step") and ys (seeds, windows),
    truncated to the windows every seed has; (None, None) if no run recorded a loss."""
    runs = [r for r in result["runs"] if r["model"] == model and r.get("loss")]
    if not runs:
        return None, None
    n = min(len(r["loss"]["loss"]) for r in runs)
    steps = np.array(runs[0]["loss"]["step"][:n], dtype=float)
    per_epoch = result["settings"]["batch_size"] / result["settings"]["train_images"]
    xs = steps * per_epoch if x == "epoch" else steps
    return xs, np.array([r["loss"]["loss"][:n] for r in runs], dtype=float)


def spearman(a, b):
    """Spearman's rank correlation of two 1-d arrays (ties broken by order)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def markdown_summary(result):
    """convergence.md: how the numbers were made, and one table."""
    s, m = result["settings"], result["machine"]
    lines = ["# Convergence and scales, in miniature",
             "",
             f"Command: `{result['command']}`  ",
             f"Commit: `{result['commit']}`{' (with uncommitted changes)' if result['dirty'] else ''}"
             f" (this invocation; runs already in the runs folder are read back, not retrained)  ",
             f"Runs trained at: {trained_at_text(result['runs'])}  ",
             f"Machine: {m.get('cpu')}, {m.get('cpu_cores')} cores, torch {m.get('torch')}, "
             f"{s['jobs']} runs at a time with {result['machine']['torch_threads']} "
             f"thread(s) each  ",
             f"Date: {result['date']}; load average at start {result['load_average']['start']}"
             f", at the last result {result['load_average']['end']}  ",
             f"Budget per run: {s['steps']} steps of batch {s['batch_size']} "
             f"({s['train_images']} training images), COCOeval every {s['eval_every']} steps "
             f"on {s['val_images']} validation images, "
             + (f"the learning rate 10x lower after step {s['lr_drop']}, "
                if s.get("lr_drop") else "")
             + (f"wall cap {s['time_limit_min']} min" if s["time_limit_min"] else
                "no wall cap")
             + ("".join(f"  \nObjects in {split} (small / medium / large): "
                        f"{c['small']} / {c['medium']} / {c['large']}"
                        for split, c in result.get("data", {}).items()))
             + ("  \n**Quick mode (CI): the numbers mean nothing.**" if result["quick"] else ""),
             "",
             "Mean over seeds (min-max), metrics in %, at the last common step:",
             "",
             "| model | seeds | step | epochs | CPU s | wall s | AP | AP50 | APs | APm | APl |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary_table(result):
        cells = ["n/a" if row[k] is None else
                 f"{100 * row[k]:.2f} ({100 * row[k + '_min']:.2f}-{100 * row[k + '_max']:.2f})"
                 for k in ("AP", "AP50", "APs", "APm", "APl")]
        lines.append(f"| {row['label']} | {row['seeds']} | {row['step']} | {row['epoch']:.2f} "
                     f"| {row['cpu_s']:.0f} | {row['wall_s']:.0f} | " + " | ".join(cells) + " |")
    if result["pending"]:
        lines += ["", f"Not finished: {', '.join(result['pending'])}"]
    if result.get("failed"):
        lines += ["", f"Failed: {'; '.join(result['failed'])}"]
    if result["runs"]:
        lines += ["", f"Training time: the runs' own wall times add up to "
                      f"{sum(r['wall_s'] for r in result['runs']) / 3600:.1f} h "
                      f"({s['jobs']} run(s) at a time)"
                  + (f"; this invocation took {result['wall_total_s'] / 60:.1f} min"
                     if "wall_total_s" in result else "")]
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def trained_at_text(runs):
    """'abc1234 (n runs), def5678 with uncommitted changes (m runs)': the code that trained."""
    counts = {}
    for run in runs:
        for entry in run.get("trained_at", []):
            key = (entry.get("commit") or "unknown")[:7] + \
                (" with uncommitted changes" if entry.get("dirty") else "")
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({n} run{'s' if n > 1 else ''})" for k, n in sorted(counts.items())) \
        or "(not recorded)"


def paper_table1_text(table):
    """Table 1 of the paper (``convergence.PAPER_TABLE1``) as fixed-width text lines."""
    head = (f"{'method':<37} {'ep':>4} {'AP':>5} {'APs':>5} {'APm':>5} {'APl':>5} "
            f"{'params':>6} {'FLOPs':>5} {'GPU h':>5} {'FPS':>4}")
    lines = [head]
    for r in table["rows"]:
        lines.append(f"{r['method']:<37} {r['epochs']:>4} {r['AP']:5.1f} {r['APs']:5.1f} "
                     f"{r['APm']:5.1f} {r['APl']:5.1f} {r['params_M']:>5}M "
                     f"{r['GFLOPs']:>4}G {r['gpu_hours']:>5} {r['fps']:>4}")
    return lines


def paper_table3_text(table):
    """Table 3 of the paper (``convergence.PAPER_TABLE3``, COCO test-dev) as text lines."""
    def metric(value):
        return f"{value:5.1f}" if value is not None else f"{'-':>5}"
    lines = [f"{'method':<16} {'backbone':<18} {'TTA':>3} {'AP':>5} {'AP50':>5} {'AP75':>5} "
             f"{'APs':>5} {'APm':>5} {'APl':>5}"]
    for r in table["rows"]:
        lines.append(f"{r['method']:<16} {r['backbone']:<18} {'yes' if r['tta'] else 'no':>3} "
                     + " ".join(metric(r[k]) for k in ("AP", "AP50", "AP75", "APs", "APm",
                                                       "APl")))
    return lines


def paper_table2_text(table):
    """Table 2 of the paper (``convergence.PAPER_TABLE2``) as fixed-width text lines, each
    row with its gain in AP and APs over the row above."""
    lines = [f"{'MS inputs':>9} {'MS attn':>7} {'K':>2} {'FPN':>5} {'AP':>5} {'APs':>5} "
             f"{'APm':>5} {'APl':>5}   gain over the row above (AP, APs)"]
    previous = None
    for r in table["rows"]:
        gain = "" if previous is None else (f"  {r['AP'] - previous['AP']:+.1f}, "
                                            f"{r['APs'] - previous['APs']:+.1f}")
        lines.append(f"{'yes' if r['ms_inputs'] else 'no':>9} "
                     f"{'yes' if r['ms_attention'] else 'no':>7} {r['K']:>2} {r['fpn']:>5} "
                     f"{r['AP']:5.1f} {r['APs']:5.1f} {r['APm']:5.1f} {r['APl']:5.1f} {gain}")
        previous = r
    return lines


def scale_gains(single, multi, keys=("AP", "APs", "APm", "APl")):
    """{key: multi[key] - single[key]} for the keys both rows hold (None: not measured)."""
    return {k: multi[k] - single[k] for k in keys
            if single.get(k) is not None and multi.get(k) is not None}
