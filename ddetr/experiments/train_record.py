"""Recorded training runs of the cpu preset (benchmarks/train_cpu.json), and this
run set beside them.

    python -m ddetr.experiments.train_record runs/cpu --name "seed 0, 30 min" \\
        --command "python -m ddetr train --config cpu time_limit_min=30" --reference

reads a finished run folder (its checkpoint: config, history), and adds it to the
"budget_runs" of benchmarks/train_cpu.json with the commit, the machine and a summary
(images per second, epochs, where the rate dropped, COCO metrics). --reference also
stores its weights compactly (benchmarks/train_cpu_reference.pth) and makes it the run
that the training chapter compares itself with.

``compare(history, reference)`` is what the chapter prints: this run and the reference
side by side, and in words why this one fell short when it did.
"""
import argparse
import json
from pathlib import Path

from ..engine.checkpoint import checkpoint_config, load_checkpoint, load_compact, save_compact
from ..engine.evaluate import METRICS
from ..models import build_model
from .machine import git_commit, load_average, machine_description
from .markdown_block import write_block

RESULTS = "train_cpu.json"
REFERENCE_WEIGHTS = "train_cpu_reference.pth"
TABLE = "train_cpu.md"                 # its "budget_runs" block is regenerated


def iterations_per_epoch(cfg):
    """Iterations in a full epoch of cfg's run (one process)."""
    n = max(cfg.synthetic_train_images // cfg.batch_size, 1)
    return min(n, cfg.iters_per_epoch) if cfg.iters_per_epoch > 0 else n


def summarise(history, batch_size, per_epoch):
    """The numbers that describe one run, from its history (log records); per_epoch:
    the iterations of a full epoch (iterations_per_epoch(cfg)).

    Returns {"epochs": trained epochs (a float: a time-limited last epoch counts its
    share), "iterations", "images", "train_min" (training and evaluation, minutes),
    "images_per_s" (of training), "threads" ({count: iterations}),
    "lr_drop_epoch" (the epoch, a float, at which the first drop came; None: none;
    "lr_drop_approx": the log gave the epoch of the drop, not its iteration),
    "time_limited", "coco" (the last evaluation), "evals" ([{"epoch", "AP", ...}])}."""
    iterations = images_time = 0
    epochs, threads, drop, evals, approx = 0.0, {}, None, [], False
    for r in history:
        n = r["train_iterations"]
        if drop is None and r["lr"] < history[0]["lr"] * 0.5:     # from the epoch's start
            drop = epochs
        elif drop is None and "lr_last" in r:                      # within the epoch
            approx = "lr_changed_at" not in r      # logs before it: the epoch's middle
            drop = epochs + r.get("lr_changed_at", n / 2) / per_epoch
        iterations += n
        epochs += n / per_epoch
        images_time += r["train_time_s"]
        for k, v in (r.get("train_threads") or {}).items():
            threads[k] = threads.get(k, 0) + v
        if r.get("coco"):
            evals.append({"epoch": round(epochs, 2), **r["coco"]})
    images = iterations * batch_size
    return {"epochs": round(epochs, 2), "iterations": iterations, "images": images,
            "train_min": round(sum(r["time_s"] for r in history) / 60, 1),
            "images_per_s": round(images / max(images_time, 1e-9), 2), "threads": threads,
            "lr_drop_epoch": None if drop is None else round(drop, 2),
            "lr_drop_approx": approx,
            "time_limited": bool(history and history[-1].get("time_limited")),
            "coco": evals[-1] if evals else {}, "evals": evals}


def record_run(run_dir, name, command, note="", out_dir="benchmarks", reference=False,
               commit=None):
    """Add the finished run in run_dir to out_dir/train_cpu.json's "budget_runs"
    (replacing a record of the same name); with reference=True also store its weights
    compactly and point "reference" at it. commit: the code's commit when the run
    trained, if not the checkout's now. Returns the record."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    state = load_checkpoint(run_dir / "checkpoint.pth")
    cfg = checkpoint_config(state, run_dir / "checkpoint.pth")
    commit, dirty = (commit, False) if commit else git_commit()
    record = {"name": name, "command": command, "note": note, "commit": commit,
              "uncommitted_changes": dirty, "machine": machine_description("cpu"),
              "load_average_after": load_average(), "time_limit_min": cfg.time_limit_min,
              "seed": cfg.seed, "threads_setting": cfg.threads,
              **summarise(state["history"], cfg.batch_size, iterations_per_epoch(cfg))}
    results_file = out_dir / RESULTS
    results = json.loads(results_file.read_text())
    runs = [r for r in results.get("budget_runs", []) if r["name"] != name]
    results["budget_runs"] = runs + [record]
    if reference:
        model = build_model(cfg)[0]
        model.load_state_dict(state["model"])
        save_compact(model, cfg, state.get("categories", {}), out_dir / REFERENCE_WEIGHTS,
                     source={"name": name, "command": command, "commit": commit})
        results["reference"] = {"name": name, "weights": REFERENCE_WEIGHTS}
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    write_block(out_dir / TABLE, "budget_runs", budget_table(results),
                title="Training the cpu preset on the synthetic set (2-core CPU)")
    return record


def budget_table(results):
    """Markdown: one row per recorded budget run."""
    lines = ["| run | command | commit | threads used | images/s | epochs | lr drop at epoch "
             "| AP | AP50 | APs | APm | APl |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("budget_runs", []):
        c = r["coco"]
        threads = ", ".join(f"{k}: {v}" for k, v in sorted(r["threads"].items()))
        drop = "-" if r["lr_drop_epoch"] is None else (
            ("~" if r.get("lr_drop_approx") else "") + f"{r['lr_drop_epoch']:.2f}")
        cells = [r["name"], f"`{r['command']}`", (r["commit"] or "?")[:7], threads,
                 f"{r['images_per_s']:.2f}", f"{r['epochs']:.2f}", drop]
        cells += ["-" if c.get(m) is None else f"{c[m]:.3f}"
                  for m in ("AP", "AP50", "APs", "APm", "APl")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reference_run(out_dir="benchmarks"):
    """(the reference record, the path of its compact weights) from train_cpu.json."""
    results = json.loads((Path(out_dir) / RESULTS).read_text())
    ref = results["reference"]
    record = next(r for r in results["budget_runs"] if r["name"] == ref["name"])
    return record, Path(out_dir) / ref["weights"]


def load_reference_model(out_dir="benchmarks"):
    """(model, postprocessor, cfg, categories, source) of the reference run's weights."""
    return load_compact(reference_run(out_dir)[1])


def compare(mine, reference, goal_ap=0.5):
    """(table, verdict): two summaries (see summarise) side by side, and one paragraph
    on what this run reached and, when it fell short of the goal, why."""
    rows = [("time (min)", "train_min", "{:.1f}"), ("images/s", "images_per_s", "{:.2f}"),
            ("epochs trained", "epochs", "{:.2f}"), ("lr dropped at epoch", "lr_drop_epoch",
                                                     "{:.2f}")]
    rows += [(m, ("coco", m), "{:.3f}") for m in METRICS]
    lines = [f"{'':22}{'this run':>12}{'reference':>12}"]
    for label, key, fmt in rows:
        cells = []
        for s in (mine, reference):
            v = s[key[0]].get(key[1]) if isinstance(key, tuple) else s.get(key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append(f"{label:22}{cells[0]:>12}{cells[1]:>12}")
    return "\n".join(lines), _verdict(mine, reference, goal_ap)


def _verdict(mine, reference, goal_ap):
    ap = mine["coco"].get("AP")
    if ap is None:
        return "This run has not been evaluated yet."
    speed = mine["images_per_s"] / reference["images_per_s"]
    said = [f"This run reached AP {ap:.3f} after {mine['epochs']:.1f} epochs at "
            f"{mine['images_per_s']:.1f} images/s ({speed:.0%} of the reference's speed)."]
    if ap >= goal_ap:
        said.append(f"It meets the goal of AP {goal_ap}.")
        return " ".join(said)
    reasons = []
    if mine["epochs"] < 0.9 * reference["epochs"]:
        why = "its time limit stopped it" if mine["time_limited"] else "it was set shorter"
        reasons.append(f"it trained {mine['epochs']:.1f} epochs against the reference's "
                       f"{reference['epochs']:.1f} ({why})")
    if speed < 0.8:
        one = mine["threads"].get("1", 0) > sum(mine["threads"].values()) / 2
        reasons.append("this machine trained more slowly" + (
            ", mostly on one thread: the thread tuner found the CPU shared with other "
            "work" if one else ""))
    if mine["lr_drop_epoch"] is None:
        reasons.append("it stopped before the learning-rate drop")
    if not reasons and reference["coco"].get("AP", 0) < goal_ap:
        reasons.append(f"so did the reference run (AP {reference['coco']['AP']:.3f} at "
                       f"{reference['images_per_s']:.1f} images/s): the preset needs more "
                       f"images than this budget gives at this speed "
                       f"(benchmarks/train_cpu.md)")
    said.append(f"It falls short of the goal (AP {goal_ap}): " +
                ("; ".join(reasons) if reasons else "with the same budget and speed, which "
                 "is the spread between seeds") + ". The reference run's predictions follow.")
    return " ".join(said)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--name", required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--note", default="")
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--reference", action="store_true")
    p.add_argument("--commit", default=None, help="the commit the run trained at")
    args = p.parse_args(argv)
    record = record_run(args.run_dir, args.name, args.command, args.note, args.out,
                        args.reference, args.commit)
    print(json.dumps({k: record[k] for k in ("name", "epochs", "images_per_s",
                                            "lr_drop_epoch", "coco")}))


if __name__ == "__main__":
    main()
