"""The paper's claims in miniature: ``python -m ddetr experiment convergence``.

Deformable DETR (Zhu et al., ICLR 2021) claims that (1) it converges far faster than
DETR -- better AP with 10x fewer epochs -- and (2) multi-scale feature maps help small
objects most. This script trains, on the same synthetic set, with the same backbone
and width (BASE below: the book's "cpu" preset as it was when the committed results
were made -- ResNet-18 with frozen batch norm, d_model 128, 2+2 layers, 30 queries,
one stage), the same number of optimizer steps and the same wall-clock cap, the models
of RUNS below, and scores each with COCOeval every ``eval_every`` steps:

    detr                    dense attention (ddetr.models.detr)
    deformable_single_scale deformable attention on C5 only (num_feature_levels=1)
    deformable_multi_scale  4 levels (C3-C5 + one extra stride-2 level)
    deformable_refine       multi-scale + iterative bounding-box refinement
    deformable_dab          + DAB-style anchor-box queries (query_anchors="dab"), the
                            "what came next" illustration

How a fixed step budget maps onto the engine: ``train`` evaluates after every "epoch",
so a run is ``steps / eval_every`` engine epochs of ``iters_per_epoch = eval_every``
batches each (each chunk draws its batches from a fresh shuffle of the training set,
seeded by (seed, chunk)). The learning rate is never dropped (a 50-epoch schedule has
no meaning at ~1 epoch). The epochs reported are real passes over the data:
step * batch_size / number of training images. Time is training time only (evaluation
excluded), as in the paper's figure, measured two ways: ``wall_s`` (the engine's
``train_time_s``) and ``cpu_s`` (its ``train_cpu_s``, the process's CPU time). With one
torch thread per run, CPU time is what the run would take alone on one core, whatever
else the (shared) machine was doing; wall time also counts the waiting.

Runs go to a process pool (``--jobs``), each process with ``--threads`` torch threads:
on a 2-core CPU, two one-thread runs side by side give more throughput than one
two-thread run, and every run sees the same kind of core. Results are rewritten after
every finished run, so a run that is cut short still leaves what finished.

Output (``--out``, default benchmarks/): ``convergence.json`` (schema below),
``convergence.md`` (a short table) and, when the multi-scale seed-0 run is in the set,
``convergence_multi_scale_seed0.pth``: its weights stored compactly (int8 per output
channel for large matrices, fp16 for the rest) so that the book can show what the
trained model learned without training it.

Schema of convergence.json (version "ddetr.convergence/1")::

    {"schema", "command", "commit", "dirty", "machine": {cpu, cpu_cores, torch, ...},
     "date", "quick", "load_average": {"start", "end"},
     "settings": {preset, steps, eval_every, batch_size, train_images, val_images,
                  time_limit_min, start_within_min, jobs, threads, seeds, data_path},
     "runs": [{"model", "label", "seed", "overrides", "params", "steps", "epochs",
               "wall_s", "cpu_s", "total_s", "time_limited",
               "evals": [{"step", "epoch", "wall_s", "cpu_s", "AP", "AP50", "AP75",
                          "APs", "APm", "APl"}],
               "loss": {"step": [...], "loss": [...]},   # mean training loss per 10 steps
               "compact", "compact_AP"}],         # the last two: multi-scale seed 0 only
     "pending": ["<model>/seed<k>", ...],   # runs not finished (or not started in time)
     "failed": [...],                       # only if a run raised
     "wall_total_s",                        # from the start to the last finished run
     "paper": {...}}                        # the paper's numbers, for the tables

Metrics are COCOeval's, in [0, 1].
"""
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

import torch

SCHEMA = "ddetr.convergence/1"
METRIC_KEYS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]

# (model name, label for plots, config overrides on top of the "cpu" preset)
RUNS = [
    ("detr", "DETR (dense)", {"architecture": "detr", "num_feature_levels": 1,
                               "with_box_refine": False}),
    ("deformable_single_scale", "Deformable, single scale",
     {"num_feature_levels": 1, "with_box_refine": False}),
    ("deformable_multi_scale", "Deformable, multi-scale",
     {"num_feature_levels": 4, "with_box_refine": False}),
    ("deformable_refine", "Deformable, multi-scale + refinement",
     {"num_feature_levels": 4, "with_box_refine": True}),
    ("deformable_dab", "Deformable + DAB anchor boxes",
     {"num_feature_levels": 4, "with_box_refine": True, "query_anchors": "dab"}),
]

# Every run starts from the "cpu" preset with these values, those of the preset when
# benchmarks/convergence.json was made (the preset has since moved to a RegNet backbone
# and two-stage proposals, benchmarks/train_cpu.md); pinned so the command reproduces it.
BASE = {"backbone": "resnet18", "backbone_norm": "frozen_bn", "dropout": 0.1,
        "num_queries": 30, "two_stage": False, "lr": 2e-4, "lr_backbone": 1e-4,
        "amp": False}

# The paper's numbers (COCO val2017, ResNet-50), for the tables next to ours.
PAPER = {
    "source": "Zhu et al., Deformable DETR, ICLR 2021 (numbers as quoted in issue 7)",
    "scales": [
        {"model": "single scale", "epochs": 50, "AP": 39.4, "APs": 20.6},
        {"model": "multi-scale", "epochs": 50, "AP": 44.5, "APs": 27.1},
    ],
    "convergence": "Deformable DETR (50 epochs) beats DETR (500 epochs), "
                   "especially on small objects: 10x fewer epochs",
}

FULL = dict(steps=400, eval_every=100, seeds=(0, 1), jobs=2, threads=1,
            time_limit_min=20.0, data_path="data/synthetic", train_images=1500,
            val_images=200)
QUICK = dict(steps=2, eval_every=1, seeds=(0,), jobs=1, threads=0,
             time_limit_min=2.0, data_path="data/synthetic_experiment_quick",
             train_images=8, val_images=4, image_size=128)

COMPACT_NAME = "convergence_multi_scale_seed0.pth"


# --- one run -------------------------------------------------------------------------
def run_config(model, overrides, seed, settings, output_dir):
    """The Config of one run: the cpu preset + BASE + the model's overrides + the budget."""
    from .config import get_config

    values = {**BASE, **overrides, "seed": seed, "output_dir": str(output_dir),
              "data_path": settings["data_path"],
              "synthetic_train_images": settings["train_images"],
              "synthetic_val_images": settings["val_images"],
              "iters_per_epoch": settings["eval_every"],
              "epochs": settings["steps"] // settings["eval_every"],
              "lr_drop": 10 ** 6, "eval_every": 1,
              "time_limit_min": settings["time_limit_min"], "device": "cpu"}
    if settings.get("image_size"):
        size = settings["image_size"]
        values.update(synthetic_image_size=size, train_scales=[size], max_size=size,
                      val_scale=size)
    return get_config("cpu", values)


def train_run(model, label, overrides, seed, settings, run_dir, threads=0, not_after=None):
    """Train one model/seed with the engine; return its record (see the schema), or
    None when the time.time() not_after has passed before it could start."""
    from .engine import train
    from .models import count_parameters

    if not_after is not None and time.time() > not_after:
        return None
    if threads:
        torch.set_num_threads(threads)
    cfg = run_config(model, overrides, seed, settings, run_dir)
    t0 = time.perf_counter()
    run = train(cfg, progress=False)
    total = time.perf_counter() - t0
    n_train = settings["train_images"]
    evals, steps, wall, cpu = [], 0, 0.0, 0.0
    for record in run["history"]:
        steps += record["train_iterations"]
        wall += record["train_time_s"]
        cpu += record.get("train_cpu_s", float("nan"))
        if "coco" in record:
            evals.append({"step": steps, "epoch": round(steps * cfg.batch_size / n_train, 4),
                          "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                          **{k: round(record["coco"][k], 5) for k in METRIC_KEYS}})
    out = {"model": model, "label": label, "seed": seed, "overrides": overrides,
           "params": count_parameters(run["model"])[0], "steps": steps,
           "epochs": round(steps * cfg.batch_size / n_train, 4), "wall_s": round(wall, 2),
           "cpu_s": round(cpu, 2), "total_s": round(total, 2),
           "time_limited": bool(run["history"] and run["history"][-1].get("time_limited")),
           "evals": evals, "loss": loss_curve(run["history"])}
    if model == "deformable_multi_scale" and seed == 0:
        out["compact"] = str(Path(run_dir) / COMPACT_NAME)
        save_compact(run["model"], cfg, run["categories"], out["compact"],
                     source={k: out[k] for k in ("model", "seed", "steps", "epochs")})
        # what the int8 storage costs: the same evaluation with the restored weights
        out["compact_AP"] = round(_evaluate_compact(out["compact"], cfg)["AP"], 5)
    return out


def _evaluate_compact(path, cfg):
    from torch.utils.data import DataLoader

    from .data import build_dataset, collate
    from .engine import evaluate

    model, postprocessor = load_compact(path)[:2]
    val_set = build_dataset("val", cfg)
    loader = DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate)
    return evaluate(model, postprocessor, loader, val_set.coco, torch.device("cpu"),
                    progress=False)


def loss_curve(history, every=10):
    """The training loss (weighted total, as optimised) averaged over every `every`
    steps, from the engine's history (or log.jsonl records): {"step": [...], "loss": [...]}
    with step the last step of each window. The loss is the same function for every
    model (same matcher, criterion and number of decoder layers), so unlike AP near
    zero it shows progress from the first steps."""
    losses = [v for record in history for v in record.get("train_loss_per_iter", [])]
    steps, means = [], []
    for i in range(0, len(losses) - every + 1, every):
        steps.append(i + every)
        means.append(round(sum(losses[i:i + every]) / every, 4))
    return {"step": steps, "loss": means}


def fill_loss_curves(result_path, runs_dir="runs/convergence"):
    """Add "loss" to the runs of a results file that lack it, from each run's
    log.jsonl (for results recorded before train_run stored loss curves)."""
    from .engine import read_log

    path = Path(result_path)
    result = json.loads(path.read_text())
    for run in result["runs"]:
        log = Path(runs_dir) / f"{run['model']}_seed{run['seed']}" / "log.jsonl"
        if "loss" not in run and log.is_file():
            run["loss"] = loss_curve(read_log(log))
            run["loss_from"] = str(log)
    _write(result, path.parent)
    return result


def merge_runs(result_path, other_path, note):
    """Move the runs of another results file (e.g. a pending run finished separately,
    same settings) into result_path: they leave "pending", and "notes" records where
    they came from (note, the other file's command, commit and date)."""
    path = Path(result_path)
    result, other = json.loads(path.read_text()), json.loads(Path(other_path).read_text())
    for run in other["runs"]:
        run = {**run, "source": {k: other[k] for k in ("command", "commit", "dirty", "date")}}
        result["runs"].append(run)
        key = f"{run['model']}/seed{run['seed']}"
        if key in result["pending"]:
            result["pending"].remove(key)
    known = [r[0] for r in RUNS]
    result["runs"].sort(key=lambda r: (known.index(r["model"]), r["seed"]))
    result.setdefault("notes", []).append(note)
    _write(result, path.parent)
    return result


# --- compact weights (for the book) ---------------------------------------------------
def save_compact(model, cfg, categories, path, source=None):
    """Save model's weights small enough to commit: tensors with >= 2 dims and more than
    4096 values as int8 with one float scale per output channel (symmetric), the rest
    as fp16. About a quarter of the float32 size; ``load_compact`` restores floats."""
    from .config import config_to_dict

    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().cpu()
        if t.dim() >= 2 and t.numel() > 4096:
            flat = t.reshape(t.shape[0], -1)
            scale = flat.abs().amax(1).clamp(min=1e-12) / 127.0
            q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
            state[name] = {"q": q.reshape(t.shape), "scale": scale.half()}
        elif t.is_floating_point():
            state[name] = t.half()
        else:
            state[name] = t
    torch.save({"format": "ddetr.compact/1", "config": config_to_dict(cfg),
                "categories": categories, "source": source or {}, "state": state}, path)


def load_compact(path):
    """(model in eval mode, postprocessor, cfg, categories, source) from save_compact."""
    from .config import get_config
    from .models import build_model

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != "ddetr.compact/1":
        raise ValueError(f"{path} is not a compact checkpoint (format "
                         f"{blob.get('format')!r}, expected 'ddetr.compact/1')")
    cfg = get_config("cpu", blob["config"])
    model, _, postprocessor = build_model(cfg)
    state = {}
    for name, v in blob["state"].items():
        if isinstance(v, dict):
            shape = v["q"].shape
            v = (v["q"].reshape(shape[0], -1).float()
                 * v["scale"].float()[:, None]).reshape(shape)
        state[name] = v.float() if v.is_floating_point() else v
    model.load_state_dict(state)
    return model.eval(), postprocessor, cfg, blob["categories"], blob["source"]


# --- what the trained model learned: where its queries sample --------------------------
@torch.no_grad()
def decoder_sampling(model, image, layer=-1):
    """Run model on one image (3, H, W) and record the cross-attention sampling of one
    decoder layer. Returns (outputs of the model for the image, the record of
    ``ddetr.models.record_sampling`` with its batch dimension removed)."""
    from .models import record_sampling

    name = f"transformer.decoder.layers.{layer % len(model.transformer.decoder.layers)}" \
           ".cross_attn"
    H, W = image.shape[-2:]
    model.eval()
    with record_sampling(model, [name]) as records:
        outputs = model(image[None], torch.zeros(1, H, W, dtype=torch.bool))
    return outputs, {k: (v[0] if k != "spatial_shapes" else v)
                     for k, v in records[name].items()}


def query_spread(record, image_size):
    """How far each query samples from its reference point, in pixels of the image.

    Args:
        record: one image's record from ``decoder_sampling`` (sampling_locations
            (Lq, M, L, K, 2), attention_weights (Lq, M, L, K), reference_points
            (Lq, L, 2|4)).
        image_size: (H, W) of the image the model saw (no padding).
    Returns:
        spread (Lq,): the attention-weighted mean distance over each head's L*K points,
        averaged over the M heads; level_spread (Lq, L): the same within each level
        (weights renormalised per level).
    """
    H, W = image_size
    loc, w = record["sampling_locations"], record["attention_weights"]
    ref = record["reference_points"][:, None, :, None, :2]          # (Lq, 1, L, 1, 2)
    scale = torch.tensor([W, H], dtype=loc.dtype)
    dist = ((loc - ref) * scale).norm(dim=-1)                         # (Lq, M, L, K)
    spread = (w * dist).sum((2, 3)).mean(1)
    level = (w * dist).sum(3) / w.sum(3).clamp(min=1e-12)             # (Lq, M, L)
    return spread, level.mean(1)


def sampling_spread(model, dataset, num_images=40, iou_threshold=0.5, layer=-1):
    """How far the queries that found an object sample, against the object's size.

    For each ground-truth box of the first num_images images of dataset, the query
    whose predicted box overlaps it most (if IoU >= iou_threshold) is kept.

    Returns a dict of numpy arrays over the P kept objects: "box_size" (P,)
    sqrt(w h) of the ground-truth box in pixels, "spread" (P,) and "level_spread"
    (P, L) from ``query_spread`` in pixels, "iou" (P,), "score" (P,) the query's
    class probability, "image" (P,) the image index.
    """
    import numpy as np
    from torchvision.ops import box_convert, box_iou

    keys = ("box_size", "spread", "level_spread", "iou", "score", "image")
    found = {k: [] for k in keys}
    for i in range(min(num_images, len(dataset))):
        image, target = dataset[i]
        H, W = image.shape[-2:]
        outputs, record = decoder_sampling(model, image, layer)
        pred = box_convert(outputs["pred_boxes"][0], "cxcywh", "xyxy")
        gt = box_convert(target["boxes"], "cxcywh", "xyxy")
        if len(gt) == 0:
            continue
        iou, query = box_iou(gt, pred).max(1)                       # per object
        keep = iou >= iou_threshold
        spread, level = query_spread(record, (H, W))
        prob = outputs["pred_logits"][0].sigmoid().max(-1).values
        gt_wh = target["boxes"][keep, 2:] * torch.tensor([W, H])
        found["box_size"].append(gt_wh.prod(-1).sqrt())
        found["spread"].append(spread[query[keep]])
        found["level_spread"].append(level[query[keep]])
        found["iou"].append(iou[keep])
        found["score"].append(prob[query[keep]])
        found["image"].append(torch.full((int(keep.sum()),), i))
    return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in found.items()}


# --- the experiment ------------------------------------------------------------------
def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _load():
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _write(result, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".convergence.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out_dir / "convergence.json")
    (out_dir / "convergence.md").write_text(markdown_summary(result))


def run_experiment(out_dir="benchmarks", quick=False, models=None, seeds=None, steps=None,
                   eval_every=None, jobs=None, threads=None, time_limit_min=None,
                   runs_dir="runs/convergence", command=None, start_within_min=None):
    """Train every (model, seed) of the experiment and write the results; returns them.

    Args (None = the mode's default, FULL or QUICK above):
        out_dir: where convergence.json/.md (and the compact checkpoint) go.
        quick: a few steps on a tiny generated set (CI).
        models: names from RUNS (default all); seeds: iterable of ints.
        steps, eval_every: optimizer steps per run, steps between COCO evaluations.
        jobs: runs at a time (processes); threads: torch threads per run (0 = default).
        time_limit_min: wall-clock cap per run (training + evaluation).
        runs_dir: the engine's output folders (checkpoints, logs), one per run.
        start_within_min: no run starts later than this many minutes after the
            experiment did (those left are listed as "pending"); None = no limit.
    """
    from .bench import machine_description

    settings = dict(QUICK if quick else FULL)
    for key, value in dict(steps=steps, eval_every=eval_every, jobs=jobs, threads=threads,
                           time_limit_min=time_limit_min, seeds=seeds).items():
        if value is not None:
            settings[key] = value
    settings["seeds"] = list(settings["seeds"])
    settings["start_within_min"] = start_within_min
    if settings["steps"] % settings["eval_every"]:
        raise ValueError(f"steps ({settings['steps']}) must be a multiple of eval_every "
                         f"({settings['eval_every']})")
    known = [r[0] for r in RUNS]
    models = list(models or known)
    unknown = sorted(set(models) - set(known))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; expected some of {known}")
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)

    # every seed of the first models before later ones: if time runs out, what is
    # missing is the tail (the most expensive variants' second seeds)
    first = [r for r in RUNS if r[0] in models]
    late = ("deformable_refine", "deformable_dab")
    order = [(r, settings["seeds"][0]) for r in first]
    order += [(r, s) for s in settings["seeds"][1:] for r in first if r[0] not in late]
    order += [(r, s) for s in settings["seeds"][1:] for r in first if r[0] in late]
    from .data import ensure_data   # once, before the workers read it
    cfg0 = run_config("detr", {}, 0, settings, runs_dir)
    ensure_data(cfg0)

    result = {"schema": SCHEMA,
              "command": command or "python -m ddetr experiment convergence"
                                    + (" --quick" if quick else ""),
              "commit": _git("rev-parse", "HEAD"),
              "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
              "machine": machine_description("cpu"),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "quick": quick, "load_average": {"start": _load(), "end": None},
              "settings": {"preset": "cpu", "batch_size": cfg0.batch_size, **settings},
              "runs": [], "pending": [f"{r[0]}/seed{s}" for r, s in order],
              "paper": PAPER}
    result["machine"]["torch_threads"] = settings["threads"] or torch.get_num_threads()
    _write(result, out_dir)
    t_start = time.perf_counter()

    def finished(record):
        if record is None:              # skipped: started too late (stays "pending")
            return
        result["runs"].append(record)
        result["runs"].sort(key=lambda r: (known.index(r["model"]), r["seed"]))
        result["pending"].remove(f"{record['model']}/seed{record['seed']}")
        if record.get("compact"):
            target = out_dir / COMPACT_NAME
            Path(record["compact"]).replace(target)
            record["compact"] = str(target)
        result["load_average"]["end"] = _load()
        result["wall_total_s"] = round(time.perf_counter() - t_start, 1)
        _write(result, out_dir)
        print(f"done {record['model']} seed {record['seed']}: {record['steps']} steps, "
              f"{record['wall_s']:.0f} s, AP {record['evals'][-1]['AP']:.4f}", flush=True)

    not_after = None if start_within_min is None else time.time() + 60 * start_within_min
    args = [(name, label, overrides, seed, settings, runs_dir / f"{name}_seed{seed}",
             settings["threads"], not_after) for (name, label, overrides), seed in order]
    if settings["jobs"] <= 1:
        for a in args:
            finished(train_run(*a))
    else:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(settings["jobs"], mp_context=ctx) as pool:
            futures = {pool.submit(train_run, *a): a for a in args}
            for future in as_completed(futures):
                try:
                    finished(future.result())
                except Exception as e:     # record it, keep the other runs going
                    name, seed = futures[future][0], futures[future][3]
                    result.setdefault("failed", []).append(f"{name}/seed{seed}: {e!r}")
                    _write(result, out_dir)
    return result


# --- reading the results ----------------------------------------------------------------
def load_results(path="benchmarks/convergence.json"):
    """The recorded results (a dict in the schema above)."""
    result = json.loads(Path(path).read_text())
    if result.get("schema") != SCHEMA:
        raise ValueError(f"{path}: schema {result.get('schema')!r}, expected {SCHEMA!r}")
    return result


def summary_table(result, metrics=METRIC_KEYS, at_step=None):
    """Per model: mean, min and max over seeds of each metric at the final common step
    (or at_step). Returns a list of dicts {"model", "label", "seeds", "step", "epoch",
    "wall_s", metric: mean, metric + "_min", metric + "_max"}."""
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
        for m in metrics:
            values = [e[m] for e in evals]
            row[m] = sum(values) / len(values)
            row[m + "_min"], row[m + "_max"] = min(values), max(values)
        rows.append(row)
    return rows


def markdown_summary(result):
    """convergence.md: how the numbers were made, and one table."""
    s, m = result["settings"], result["machine"]
    lines = ["# Convergence and scales, in miniature",
             "",
             f"Command: `{result['command']}`  ",
             f"Commit: `{result['commit']}`{' (with uncommitted changes)' if result['dirty'] else ''}  ",
             f"Machine: {m.get('cpu')}, {m.get('cpu_cores')} cores, torch {m.get('torch')}, "
             f"{s['jobs']} runs at a time with {result['machine']['torch_threads']} "
             f"thread(s) each  ",
             f"Date: {result['date']}; load average at start {result['load_average']['start']}"
             f", at the last result {result['load_average']['end']}  ",
             f"Budget per run: {s['steps']} steps of batch {s['batch_size']} "
             f"({s['train_images']} training images), COCOeval every {s['eval_every']} steps "
             f"on {s['val_images']} validation images, wall cap {s['time_limit_min']} min"
             + ("  \n**Quick mode (CI): the numbers mean nothing.**" if result["quick"] else ""),
             "",
             "Mean over seeds (min-max), metrics in %, at the last common step:",
             "",
             "| model | seeds | step | epochs | CPU s | wall s | AP | AP50 | APs | APm | APl |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary_table(result):
        cells = [f"{100 * row[k]:.2f} ({100 * row[k + '_min']:.2f}-{100 * row[k + '_max']:.2f})"
                 for k in ("AP", "AP50", "APs", "APm", "APl")]
        lines.append(f"| {row['label']} | {row['seeds']} | {row['step']} | {row['epoch']:.2f} "
                     f"| {row['cpu_s']:.0f} | {row['wall_s']:.0f} | " + " | ".join(cells) + " |")
    if result["pending"]:
        lines += ["", f"Not finished: {', '.join(result['pending'])}"]
    if result.get("failed"):
        lines += ["", f"Failed: {'; '.join(result['failed'])}"]
    if "wall_total_s" in result:
        lines += ["", f"Wall time of the whole experiment: {result['wall_total_s'] / 60:.1f} min"]
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


# --- the command line ------------------------------------------------------------------
def run_command(args):
    quick = args.quick or os.environ.get("DDETR_QUICK", "") not in ("", "0")
    try:
        run_experiment(args.out, quick, args.models, args.seeds, args.steps,
                       args.eval_every, args.jobs, args.threads, args.time_limit_min,
                       args.runs_dir, command="python -m ddetr " + " ".join(sys.argv[1:]),
                       start_within_min=args.start_within_min)
    except ValueError as e:
        raise SystemExit(f"python -m ddetr experiment: {e}") from None
    print((Path(args.out) / "convergence.md").read_text())
    return 0


def main(argv=None):
    from .cli import main as cli_main
    return cli_main(["experiment", *(argv or sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
