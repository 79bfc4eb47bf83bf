"""Recorded training runs of the cpu preset (benchmarks/train_cpu.json), and this
run set beside them.

    python -m ddetr experiment record runs/cpu --name "seed 0, 15 min" \\
        --command "python -m ddetr train --config cpu time_limit_min=15" --reference

reads a finished run folder (its checkpoint: config, history), and adds it to the
"budget_runs" (or, --section recipe_runs, the recipe comparisons at a fixed number of
images) of benchmarks/train_cpu.json with the commit, the machine (the processor, and
whether it computes bfloat16 natively), the precision it trained in and a summary
(images seen, images per second, epochs, where the rate dropped, COCO metrics).
--reference also stores its weights compactly and makes it the run that the training
chapter compares itself with on the same kind of processor: there is one reference for
processors with native bfloat16 (``train_cpu_reference.pth``) and one for those
without (``train_cpu_reference_float32.pth``).

The goal and the budget per kind of processor (issue 32): AP >= GOAL_AP within
``budget_min()`` minutes: 15 where bfloat16 is native, 20 elsewhere (float32, e.g. an
AVX2-only CPU).

``compare(history, reference)`` is what the chapter prints: this run and the reference
side by side, and in words why this one fell short when it did.
"""
import json
from pathlib import Path

from ..engine.checkpoint import checkpoint_config, load_checkpoint, load_compact, save_compact
from ..engine.evaluate import METRICS
from ..engine.precision import cpu_has_native_bf16
from ..models import build_model
from .machine import git_commit, load_average, machine_description
from .markdown_block import write_block

RESULTS = "train_cpu.json"
REFERENCE_WEIGHTS = "train_cpu_reference.pth"
REFERENCE_FILES = {True: REFERENCE_WEIGHTS, False: "train_cpu_reference_float32.pth"}
TABLE = "train_cpu.md"                 # its blocks, one per section, are regenerated
SECTIONS = ("budget_runs", "recipe_runs")
GOAL_AP = 0.5


def budget_min(native_bf16=None):
    """The training chapter's time budget in minutes: 15 where the CPU has native
    bfloat16 (None: this machine), 20 elsewhere."""
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    return 15 if native else 20


def processor_kind(native_bf16):
    """A short name of the kind of processor, as the records and the chapter say it."""
    return "native bfloat16" if native_bf16 else "no native bfloat16 (float32)"


def iterations_per_epoch(cfg):
    """Iterations in a full epoch of cfg's run (one process)."""
    n = max(cfg.synthetic_train_images // cfg.batch_size, 1)
    return min(n, cfg.iters_per_epoch) if cfg.iters_per_epoch > 0 else n


def summarise(history, batch_size, per_epoch):
    """The numbers that describe one run, from its history (log records); per_epoch:
    the iterations of a full epoch (iterations_per_epoch(cfg)).

    Returns {"epochs": trained epochs (a float: a time-limited last epoch counts its
    share), "iterations", "images_seen", "train_min" (training and evaluation, minutes),
    "images_per_s" (of training), "threads" ({count: iterations}),
    "lr_drop_epoch" (the epoch, a float, at which the first drop came; None: none;
    "lr_drop_approx": the log gave the epoch of the drop, not its iteration),
    "time_limited", "coco" (the last evaluation), "evals" ([{"epoch", "AP", ...}])}."""
    iterations = images_time = 0
    epochs, threads, drop, evals, approx, peak = 0.0, {}, None, [], False, 0.0
    for r in history:
        n, first = r["train_iterations"], r["lr"]
        last = r.get("lr_last", first)    # a warm-up's rates rise: only a fall is a drop
        if drop is None and first < peak * 0.5:                    # from the epoch's start
            drop = epochs
        elif drop is None and last < first * 0.5:                  # within the epoch
            approx = "lr_changed_at" not in r      # logs before it: the epoch's middle
            drop = epochs + r.get("lr_changed_at", n / 2) / per_epoch
        peak = max(peak, first, last)
        iterations += n
        epochs += n / per_epoch
        images_time += r["train_time_s"]
        for k, v in (r.get("train_threads") or {}).items():
            threads[k] = threads.get(k, 0) + v
        if r.get("coco"):
            evals.append({"epoch": round(epochs, 2), **r["coco"]})
    images = iterations * batch_size
    return {"epochs": round(epochs, 2), "iterations": iterations, "images_seen": images,
            "train_min": round(sum(r["time_s"] for r in history) / 60, 1),
            "images_per_s": round(images / max(images_time, 1e-9), 2), "threads": threads,
            "lr_drop_epoch": None if drop is None else round(drop, 2),
            "lr_drop_approx": approx,
            "time_limited": bool(history and history[-1].get("time_limited")),
            "coco": evals[-1] if evals else {}, "evals": evals}


def record_run(run_dir, name, command, note="", out_dir="benchmarks", reference=False,
               commit=None, section="budget_runs", recipe="preset"):
    """Add the finished run in run_dir to out_dir/train_cpu.json's `section`
    ("budget_runs" or "recipe_runs"; a record of the same name is replaced); with
    reference=True also store its weights compactly and make it the reference of its
    kind of processor. commit: the code's commit when the run trained, if not the
    checkout's now; recipe: a short name of what the run changed (e.g. "dn_detr").
    Returns the record."""
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {list(SECTIONS)}, got {section!r}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    state = load_checkpoint(run_dir / "checkpoint.pth")
    cfg = checkpoint_config(state, run_dir / "checkpoint.pth")
    commit, dirty = (commit, False) if commit else git_commit()
    machine = machine_description("cpu")
    record = {"name": name, "recipe": recipe, "command": command, "note": note,
              "commit": commit,
              "uncommitted_changes": dirty, "machine": machine,
              "native_bf16": machine["native_bf16"],
              "precision": "bfloat16" if cfg.amp and machine["native_bf16"] else "float32",
              "load_average_after": load_average(), "time_limit_min": cfg.time_limit_min,
              "seed": cfg.seed, "threads_setting": cfg.threads,
              **summarise(state["history"], cfg.batch_size, iterations_per_epoch(cfg))}
    results_file = out_dir / RESULTS
    results = json.loads(results_file.read_text())
    runs = [r for r in results.get(section, []) if r["name"] != name]
    results[section] = runs + [record]
    if reference:
        model = build_model(cfg)[0]
        model.load_state_dict(state["model"])
        weights = REFERENCE_FILES[machine["native_bf16"]]
        save_compact(model, cfg, state.get("categories", {}), out_dir / weights,
                     source={"name": name, "command": command, "commit": commit})
        results.setdefault("references", {})[str(machine["native_bf16"]).lower()] = {
            "name": name, "weights": weights}
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    for block in SECTIONS:
        if results.get(block):
            write_block(out_dir / TABLE, block, budget_table(results, block),
                        title="Training the cpu preset on the synthetic set (2-core CPU)")
    return record


def budget_table(results, section="budget_runs"):
    """Markdown: one row per recorded run of the section."""
    lines = ["| run | command | commit | processor | precision | threads used | images "
             "seen | images/s | epochs | lr drop at epoch | AP | AP50 | APs | APm | APl |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.get(section, []):
        c = r["coco"]
        threads = ", ".join(f"{k}: {v}" for k, v in sorted(r["threads"].items()))
        drop = "-" if r["lr_drop_epoch"] is None else (
            ("~" if r.get("lr_drop_approx") else "") + f"{r['lr_drop_epoch']:.2f}")
        cells = [r["name"], f"`{r['command']}`", (r["commit"] or "?")[:7],
                 f"{r['machine']['cpu']}, {processor_kind(r['native_bf16'])}",
                 r["precision"], threads, str(r["images_seen"]),
                 f"{r['images_per_s']:.2f}", f"{r['epochs']:.2f}", drop]
        cells += ["-" if c.get(m) is None else f"{c[m]:.3f}"
                  for m in ("AP", "AP50", "APs", "APm", "APl")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recipe_summary(records, baseline="plain"):
    """Lines of text: per recipe of the recipe_runs records, the final AP of each seed,
    their mean and spread (max - min; a recipe run with one seed has none), the images
    seen, and each recipe's mean against the baseline recipe's with the larger of the
    two spreads beside it."""
    by_recipe = {}
    for r in records:
        by_recipe.setdefault(r["recipe"], []).append(r)
    lines, means, spreads = [], {}, {}
    for recipe, runs in by_recipe.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        aps = [r["coco"]["AP"] for r in runs]
        means[recipe] = sum(aps) / len(aps)
        spreads[recipe] = max(aps) - min(aps) if len(aps) > 1 else None
        spread = "one seed" if spreads[recipe] is None else f"spread {spreads[recipe]:.3f}"
        seeds = ", ".join(f"seed {r['seed']} {r['coco']['AP']:.3f}" for r in runs)
        lines.append(f"{recipe:<10} AP {means[recipe]:.3f} ({spread}) "
                     f"after {runs[0]['images_seen']} images: {seeds}")
    for recipe in means:
        if recipe != baseline and baseline in means:
            known = [x for x in (spreads[recipe], spreads[baseline]) if x is not None]
            lines.append(f"{recipe} - {baseline}: {means[recipe] - means[baseline]:+.3f} AP; "
                         f"the larger seed spread: "
                         + (f"{max(known):.3f}" if known else "unknown (one seed each)"))
    return lines


def reference_run(out_dir="benchmarks", native_bf16=None):
    """(the reference record, the path of its compact weights) from train_cpu.json: the
    reference of the kind of processor asked for (None: this machine's), else the
    other kind's (its record's "native_bf16" says which it is)."""
    results = json.loads((Path(out_dir) / RESULTS).read_text())
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    refs = results["references"]
    ref = refs.get(str(native).lower()) or refs[str(not native).lower()]
    record = next(r for r in results["budget_runs"] if r["name"] == ref["name"])
    return record, Path(out_dir) / ref["weights"]


def load_reference_model(out_dir="benchmarks", native_bf16=None):
    """(model, postprocessor, cfg, categories, source) of reference_run's weights."""
    return load_compact(reference_run(out_dir, native_bf16)[1])


def compare(mine, reference, goal_ap=GOAL_AP):
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
