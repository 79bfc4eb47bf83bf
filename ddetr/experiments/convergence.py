"""The paper's claims in miniature: ``python -m ddetr experiment convergence``.

Deformable DETR (Zhu et al., ICLR 2021) claims that (1) it converges far faster than
DETR -- better AP with 10x fewer epochs -- and (2) multi-scale feature maps help small
objects most. This script trains, on the same synthetic set, a small recipe of its own
(BASE below: RegNetX-400MF trained from scratch with batch norm, d_model 128, 2 encoder
and 2 decoder layers, 50 queries, AdamW at 5e-4, bfloat16 autocast: the "cpu" preset
with 2 decoder layers instead of 4 and its variant switches turned off), for the same
number of optimizer steps, the models of RUNS below, and scores each with COCOeval
every ``eval_every`` steps:

    detr                    the dense baseline: the same model with DETR's attention in
                            the encoder and the decoder's cross-attention
                            (attention="dense", C5 only) and nothing else changed --
                            the same boxes relative to reference points, heads, input
                            projection and initialisation
    deformable_single_scale deformable attention on C5 only (num_feature_levels=1)
    deformable_multi_scale  4 levels (C3-C5 + one extra stride-2 level)
    deformable_refine       multi-scale + iterative bounding-box refinement
    deformable_dab          + DAB-style anchor-box queries (query_anchors="dab"), the
                            "what came next" illustration

How a step budget maps onto the engine: ``train`` evaluates after every "epoch", so a
run is ``steps / eval_every`` engine epochs of ``iters_per_epoch = eval_every`` batches
each (each chunk draws its batches from a fresh shuffle of the training set, seeded by
(seed, chunk)); in FULL a chunk is one pass over the training set. The learning rate
drops 10x after ``lr_drop`` steps (FULL: after 7 of 8 epochs, about where the preset
drops it, 9 of 11; None: never; a run of other ``steps`` drops at the same fraction
unless told otherwise). The epochs reported are real passes over the data:
step * batch_size / number of training images. Time is training time only (evaluation
excluded), as in the paper's figure, measured two ways: ``wall_s`` (the engine's
``train_time_s``) and ``cpu_s`` (its ``train_cpu_s``, the process's CPU time). With one
torch thread per run, CPU time is what the run would take alone on one core, whatever
else the (shared) machine was doing; wall time also counts the waiting.

Resumable: every run trains in its own folder under ``runs_dir``, which the engine
checkpoints every epoch; the same command again reads finished runs back and continues
unfinished ones where they stopped (also in a later session). Each run folder keeps a
``provenance.json`` (the commits and machines that trained it), which its record in the
results carries.

Runs go to a process pool (``jobs``, see ``runner``), each process with ``threads``
torch threads. Results are rewritten after every finished run, so an experiment that
is cut short still leaves what finished. ``device="cuda"`` trains every run on the GPU
(several jobs share it); the paper's claims at a larger budget, e.g. 24 epochs:

    python -m ddetr experiment convergence --device cuda --jobs 8 --steps 9000 \
        --runs-dir runs/convergence_gpu --out benchmarks/gpu

Output (``out_dir``; the CLI's default is benchmarks/ of the current directory):
``convergence.json`` (schema in ``results``),
``convergence.md`` (a short table) and, when the multi-scale seed-0 run is in the set,
``convergence_multi_scale_seed0.pth``: its weights stored compactly (int8 per output
channel for large matrices, fp16 for the rest) so that the book can show what the
trained model learned without training it.

The results file's schema is in ``ddetr.experiments.results``.
"""
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..config import get_config
from ..data import build_dataset, coco_paths, collate, ensure_data, size_class_counts
from ..engine import evaluate, train
from ..engine.train import resolve_device, run_progress
from ..models import count_parameters
from ..engine.checkpoint import load_compact, save_compact
from .machine import git_commit, load_average, machine_description
from .results import METRIC_KEYS, SCHEMA, write_results
from .runner import run_jobs

# (model name, label for plots, config overrides on top of the "cpu" preset and BASE)
RUNS = [
    ("detr", "DETR attention (dense)", {"attention": "dense", "num_feature_levels": 1}),
    ("deformable_single_scale", "Deformable, single scale", {"num_feature_levels": 1}),
    ("deformable_multi_scale", "Deformable, multi-scale", {"num_feature_levels": 4}),
    ("deformable_refine", "Deformable, multi-scale + refinement",
     {"num_feature_levels": 4, "with_box_refine": True}),
    ("deformable_dab", "Deformable + DAB anchor boxes",
     {"num_feature_levels": 4, "with_box_refine": True, "query_anchors": "dab"}),
]

# Every run is the "cpu" preset's recipe as of this experiment (pinned here, so that a
# later change of the preset does not change -- or, resumed, mix into -- the runs) with
# its variant switches off; RUNS turns on what each model has. (The first version of
# this experiment pinned an older recipe: ResNet-18 with frozen batch norm.)
BASE = {"backbone": "regnet_x_400mf", "backbone_norm": "batch_norm", "d_model": 128,
        "n_heads": 8, "enc_layers": 2, "dec_layers": 2, "dim_feedforward": 256,
        "dropout": 0.0, "num_queries": 50, "batch_size": 4, "lr": 5e-4,
        "lr_backbone": 5e-4, "lr_linear_proj_mult": 0.1, "weight_decay": 1e-4,
        "clip_max_norm": 0.1, "amp": True, "train_scales": [224, 256], "max_size": 256,
        "val_scale": 256, "with_box_refine": False, "two_stage": False,
        "dn_detr": False, "dino_look_forward_twice": False, "h_detr": False,
        "rt_detr_vfl": False}

# the models that get every seed; the others (the costlier extensions) get late_seeds
CORE = ("detr", "deformable_single_scale", "deformable_multi_scale")

# The paper's numbers, for the tables next to ours: Zhu et al., "Deformable DETR:
# Deformable Transformers for End-to-End Object Detection", ICLR 2021 (arXiv 2010.04159),
# Tables 1 and 2; COCO 2017 val, ImageNet-pretrained ResNet-50. Metrics in %.
PAPER_SOURCE = "Zhu et al., Deformable DETR, ICLR 2021 (arXiv 2010.04159)"

# Table 1, "Comparison of Deformable DETR with DETR on COCO 2017 val set" (DETR-DC5+:
# DETR-DC5 with focal loss and 300 queries). params in millions, FLOPs in G, training in
# V100 GPU hours, inference in frames per second (V100). One dict per row, in order.
PAPER_TABLE1 = {
    "source": PAPER_SOURCE + ", Table 1",
    "columns": ["epochs", "AP", "AP50", "AP75", "APs", "APm", "APl", "params_M", "GFLOPs",
                "gpu_hours", "fps"],
    "rows": [dict(zip(["method", "epochs", "AP", "AP50", "AP75", "APs", "APm", "APl",
                       "params_M", "GFLOPs", "gpu_hours", "fps"], values)) for values in [
        ("Faster R-CNN + FPN", 109, 42.0, 62.1, 45.5, 26.6, 45.4, 53.4, 42, 180, 380, 26),
        ("DETR", 500, 42.0, 62.4, 44.2, 20.5, 45.8, 61.1, 41, 86, 2000, 28),
        ("DETR-DC5", 500, 43.3, 63.1, 45.9, 22.5, 47.3, 61.1, 41, 187, 7000, 12),
        ("DETR-DC5", 50, 35.3, 55.7, 36.8, 15.2, 37.5, 53.6, 41, 187, 700, 12),
        ("DETR-DC5+", 50, 36.2, 57.0, 37.4, 16.3, 39.2, 53.9, 41, 187, 700, 12),
        ("Deformable DETR", 50, 43.8, 62.6, 47.7, 26.4, 47.1, 58.0, 40, 173, 325, 19),
        ("+ iterative bounding box refinement", 50, 45.4, 64.7, 49.0, 26.8, 48.3, 61.7, 40,
         173, 325, 19),
        ("++ two-stage Deformable DETR", 50, 46.2, 65.2, 50.0, 28.8, 49.2, 61.7, 40, 173,
         340, 19),
    ]],
}

# Table 2, "Ablations for deformable attention on COCO 2017 val set": multi-scale inputs,
# multi-scale deformable attention, K points per head and level, an added FPN. Rows in
# the order of the four "w/o" rows, then the FPN and BiFPN rows.
PAPER_TABLE2 = {
    "source": PAPER_SOURCE + ", Table 2",
    "rows": [dict(zip(["ms_inputs", "ms_attention", "K", "fpn", "AP", "AP50", "AP75", "APs",
                       "APm", "APl"], values)) for values in [
        (False, False, 1, "w/o", 39.7, 60.1, 42.4, 21.2, 44.3, 56.0),
        (True, False, 1, "w/o", 41.4, 60.9, 44.9, 24.1, 44.6, 56.1),
        (True, False, 4, "w/o", 42.3, 61.4, 46.0, 24.8, 45.1, 56.3),
        (True, True, 4, "w/o", 43.8, 62.6, 47.7, 26.4, 47.1, 58.0),
        (True, True, 4, "FPN", 43.8, 62.6, 47.8, 26.5, 47.3, 58.1),
        (True, True, 4, "BiFPN", 43.9, 62.5, 47.7, 25.6, 47.4, 57.7),
    ]],
}

# Table 3, "Comparison of Deformable DETR with state-of-the-art methods on COCO 2017
# test-dev set" (TTA: test-time augmentation, horizontal flip and multi-scale testing).
# The Deformable DETR rows use iterative box refinement and the two-stage variant
# (Section 5.3). EfficientDet-D7 reports no APs/APm/APl (None).
PAPER_TABLE3 = {
    "source": PAPER_SOURCE + ", Table 3",
    "rows": [dict(zip(["method", "backbone", "tta", "AP", "AP50", "AP75", "APs", "APm",
                       "APl"], values)) for values in [
        ("FCOS", "ResNeXt-101", False, 44.7, 64.1, 48.4, 27.6, 47.5, 55.6),
        ("ATSS", "ResNeXt-101 + DCN", True, 50.7, 68.9, 56.3, 33.2, 52.9, 62.4),
        ("TSD", "SENet154 + DCN", True, 51.2, 71.9, 56.0, 33.8, 54.8, 64.2),
        ("EfficientDet-D7", "EfficientNet-B6", False, 52.2, 71.4, 56.3, None, None, None),
        ("Deformable DETR", "ResNet-50", False, 46.9, 66.4, 50.8, 27.7, 49.7, 59.9),
        ("Deformable DETR", "ResNet-101", False, 48.7, 68.1, 52.9, 29.1, 51.5, 62.0),
        ("Deformable DETR", "ResNeXt-101", False, 49.0, 68.5, 53.2, 29.7, 51.7, 62.8),
        ("Deformable DETR", "ResNeXt-101 + DCN", False, 50.1, 69.7, 54.6, 30.6, 52.8, 64.7),
        ("Deformable DETR", "ResNeXt-101 + DCN", True, 52.3, 71.9, 58.1, 34.4, 54.4, 65.6),
    ]],
}

# The official repository's re-trained models (fundamentalvision/Deformable-DETR, README,
# "Main Results"): the released code trained again, NOT the paper's numbers. Its single-
# scale model uses K = 4 like ours; the paper has no such row (Table 2's single scale is K=1).
REPOSITORY_SCALES = [
    {"model": "single scale", "epochs": 50, "AP": 39.4, "APs": 20.6, "APm": 43.0,
     "APl": 55.5},
    {"model": "multi-scale", "epochs": 50, "AP": 44.5, "APs": 27.1, "APm": 47.6, "APl": 59.6},
]

# What convergence.json records as "paper" (the schema's key): the scale comparison with
# its source, table and row, and the repository's pair labelled as such.
PAPER = {
    "source": PAPER_SOURCE + ", Table 2 (COCO 2017 val, ResNet-50, 50 epochs)",
    "scales": [
        {"model": "single scale", "table": "Table 2",
         "row": "no MS inputs, no MS attention, K=1, w/o FPN", "epochs": 50,
         **{k: PAPER_TABLE2["rows"][0][k] for k in ("AP", "APs", "APm", "APl")}},
        {"model": "multi-scale", "table": "Table 2",
         "row": "MS inputs, MS attention, K=4, w/o FPN", "epochs": 50,
         **{k: PAPER_TABLE2["rows"][3][k] for k in ("AP", "APs", "APm", "APl")}},
    ],
    "repository_scales": {
        "source": "fundamentalvision/Deformable-DETR README, Main Results (re-trained "
                  "with the released code; not the paper's numbers)",
        "rows": REPOSITORY_SCALES},
    "convergence": "Table 1: Deformable DETR, 50 epochs, 43.8 AP (26.4 APs) against "
                   "DETR, 500 epochs, 42.0 AP (20.5 APs): 10x fewer epochs",
}


# FULL: 8 epochs of the 1,500 training images at batch 4 (375 steps each), the drop
# after 7; three seeds of CORE, one of the others; two 1-thread runs at a time, the
# best total throughput on 2 cores (benchmarks/contention.md). No time cap: every run
# gets its whole schedule, and a run cut off by the session resumes.
EPOCH = 1500 // BASE["batch_size"]      # steps per pass over the training images
FULL = dict(steps=8 * EPOCH, eval_every=EPOCH, lr_drop=7 * EPOCH, seeds=(0, 1, 2),
            late_seeds=(0,), jobs=2, threads=1, time_limit_min=0.0,
            data_path="data/synthetic", train_images=1500, val_images=200)
QUICK = dict(steps=2, eval_every=1, lr_drop=None, seeds=(0,), late_seeds=(0,), jobs=1,
             threads=0, time_limit_min=2.0, data_path="data/synthetic_experiment_quick",
             train_images=8, val_images=4, image_size=128)

COMPACT_NAME = "convergence_multi_scale_seed0.pth"


def run_config(model, overrides, seed, settings, output_dir):
    """The Config of one run: the cpu preset + BASE + the model's overrides + the budget."""
    values = {**BASE, **overrides, "seed": seed, "output_dir": str(output_dir),
              "data_path": settings["data_path"],
              "synthetic_train_images": settings["train_images"],
              "synthetic_val_images": settings["val_images"],
              "iters_per_epoch": settings["eval_every"],
              "epochs": settings["steps"] // settings["eval_every"],
              "lr_drop": (10 ** 6 if settings.get("lr_drop") is None
                          else max(1, settings["lr_drop"] // settings["eval_every"])),
              "eval_every": 1, "threads": settings["threads"],   # 0: tuned
              "time_limit_min": settings["time_limit_min"],
              "device": settings.get("device", "cpu")}
    if settings.get("image_size"):
        size = settings["image_size"]
        values.update(synthetic_image_size=size, train_scales=[size], max_size=size,
                      val_scale=size)
    return get_config("cpu", values)


def train_run(model, label, overrides, seed, settings, run_dir, threads=0, not_after=None,
              code=None):
    """Train one model/seed with the engine; return its record (see the schema), or
    None when the time.time() not_after has passed before it could start. code: the
    (commit, dirty) of the code this process runs (default: the checkout's now)."""
    if not_after is not None and time.time() > not_after:
        return None
    cfg = run_config(model, overrides, seed, settings, run_dir)
    if threads:
        torch.set_num_threads(threads)
    provenance = note_provenance(cfg, *(code or git_commit()))
    t0 = time.perf_counter()
    run = train(cfg, resume="auto", progress=False)   # a finished run is read back
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
                          **{k: _rounded(record["coco"][k]) for k in METRIC_KEYS}})
    out = {"model": model, "label": label, "seed": seed, "overrides": overrides,
           "trained_at": provenance,
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
        out["compact_AP"] = _rounded(evaluate_compact(out["compact"], cfg)["AP"])
    return out


def note_provenance(cfg, commit, dirty):
    """Add the code's commit (and whether the checkout had uncommitted changes) and this
    machine to provenance.json in the run folder cfg.output_dir (unless the last entry
    says the same) and return its list of {"commit", "dirty", "cpu", "torch"}: every
    code version and machine that trained the run, in order. A finished run, which is
    only read back, adds nothing."""
    run_dir = Path(cfg.output_dir)
    path = run_dir / "provenance.json"
    entries = json.loads(path.read_text()) if path.is_file() else []
    finished = run_progress(cfg)[1]
    machine = machine_description("cpu")
    entry = {"commit": commit, "dirty": dirty, "cpu": machine["cpu"],
             "torch": machine["torch"]}
    if not finished and (not entries or entries[-1] != entry):
        entries.append(entry)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(entries, indent=1) + "\n")
        tmp.replace(path)
    return entries


def _rounded(metric):
    """A COCO metric to 5 digits; None (not measured: no such objects) stays None."""
    return None if metric is None else round(metric, 5)


def evaluate_compact(path, cfg):
    """COCO metrics (the engine's evaluate) of the compact weights at path on the
    validation set of cfg: what the int8 storage costs."""
    model, postprocessor = load_compact(path)[:2]
    val_set = build_dataset("val", cfg)
    loader = DataLoader(val_set, batch_size=cfg.batch_size, collate_fn=collate)
    device = resolve_device(cfg.device)
    return evaluate(model.to(device), postprocessor, loader, val_set.coco, device,
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


def run_order(runs, seeds, late_seeds):
    """(run, seed) pairs in the order they start: the first seed of every model, then
    the other seeds of CORE, then the other late_seeds of the rest -- so that a run cut
    short misses the tail, not a model."""
    order = [(r, seeds[0]) for r in runs]
    order += [(r, s) for s in seeds[1:] for r in runs if r[0] in CORE]
    order += [(r, s) for s in seeds[1:] for r in runs if r[0] not in CORE and s in late_seeds]
    return order


# The least value of each setting (the CLI's --steps, --eval-every, ...).
AT_LEAST = {"steps": 1, "eval_every": 1, "lr_drop": 1, "jobs": 1, "threads": 0,
            "time_limit_min": 0}


def experiment_settings(quick=False, device="cpu", **changes):
    """The budget of the experiment: the mode's (FULL or QUICK) with ``changes`` (keys of
    FULL, and start_within_min; None: the mode's) applied, checked. A change of steps
    without one of lr_drop moves the drop to the same fraction of the steps, rounded
    to whole evaluations; device "cuda" is recorded as "device" (a CPU run's settings
    stay as they always were)."""
    mode = QUICK if quick else FULL
    for key, least in AT_LEAST.items():
        if changes.get(key) is not None and not changes[key] >= least:
            raise ValueError(f"{key} (--{key.replace('_', '-')}) expects >= {least}, "
                             f"got {changes[key]}")
    settings = dict(mode)
    settings.update({k: v for k, v in changes.items() if v is not None})
    if changes.get("lr_drop") is None and mode["lr_drop"] and settings["steps"] != mode["steps"]:
        every = settings["eval_every"]
        settings["lr_drop"] = max(every, round(mode["lr_drop"] / mode["steps"]
                                               * settings["steps"] / every) * every)
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device != "cpu":
        settings["device"] = device
    settings["seeds"] = list(settings["seeds"])
    settings["late_seeds"] = [s for s in settings["seeds"] if s in settings["late_seeds"]] \
        or settings["seeds"][:1]
    settings["start_within_min"] = changes.get("start_within_min")
    if settings["steps"] % settings["eval_every"]:
        raise ValueError(f"steps ({settings['steps']}) must be a multiple of eval_every "
                         f"({settings['eval_every']})")
    return settings


def run_convergence(out_dir, quick=False, models=None, seeds=None, steps=None,
                    eval_every=None, jobs=None, threads=None, time_limit_min=None,
                    runs_dir="runs/convergence", command=None, start_within_min=None,
                    lr_drop=None, device="cpu"):
    """Train every (model, seed) of the experiment and write the results; returns them.

    Args (None = the mode's default, FULL or QUICK above):
        out_dir: where convergence.json/.md (and the compact checkpoint) go.
        quick: a few steps on a tiny generated set (CI).
        models: names from RUNS (default all); seeds: iterable of ints.
        steps, eval_every: optimizer steps per run, steps between COCO evaluations.
        lr_drop: the step after which the rate is 10x lower (default: the mode's, or, with
            other steps, the same fraction of them, rounded to whole evaluations).
        jobs: runs at a time (processes); threads: torch threads per run (0 = default).
        time_limit_min: wall-clock cap per run (training + evaluation).
        runs_dir: the engine's output folders (checkpoints, logs), one per run.
        command: the command line recorded in the results (default: the CLI's).
        start_within_min: no run starts later than this many minutes after the
            experiment did (those left are listed as "pending"); None = no limit.
        device: "cpu" or "cuda" (the runs share the one GPU; each jobs process has
            its own CUDA context).

    Returns:
        the results (a dict in the schema of ``ddetr.experiments.results``), also
        written to ``out_dir/convergence.json`` and ``.md`` after every finished run.
    """
    settings = experiment_settings(quick, steps=steps, eval_every=eval_every, jobs=jobs,
                                   threads=threads, time_limit_min=time_limit_min,
                                   seeds=seeds, lr_drop=lr_drop, device=device,
                                   start_within_min=start_within_min)
    resolve_device(device)              # a GPU asked for and missing: said before any work
    known = [r[0] for r in RUNS]
    models = list(models or known)
    unknown = sorted(set(models) - set(known))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; expected some of {known}")
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    order = run_order([r for r in RUNS if r[0] in models], settings["seeds"],
                      settings["late_seeds"])
    cfg0 = run_config("detr", {}, 0, settings, runs_dir)
    root = ensure_data(cfg0)                # once, before the worker processes read it
    commit, dirty = git_commit()
    command = command or "python -m ddetr experiment convergence" + (" --quick" if quick else "")
    result = new_result(command, quick, device, settings, cfg0.batch_size, root, order,
                        (commit, dirty))
    recorder = ResultRecorder(result, out_dir)
    not_after = None if start_within_min is None else time.time() + 60 * start_within_min
    jobs_args = [(name, label, overrides, seed, settings, runs_dir / f"{name}_seed{seed}",
                  settings["threads"], not_after, (commit, dirty))
                 for (name, label, overrides), seed in order]
    run_jobs(train_run, jobs_args, settings["jobs"], recorder.finished, recorder.failed)
    return result


def new_result(command, quick, device, settings, batch_size, root, order, commit):
    """The results dict of an experiment about to start: what, where and on what it
    runs, the data's size classes, no runs yet, every (model, seed) pending."""
    result = {"schema": SCHEMA, "command": command, "commit": commit[0], "dirty": commit[1],
              "machine": machine_description(device),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "quick": quick, "load_average": {"start": load_average(), "end": None},
              "settings": {"preset": "cpu", "batch_size": batch_size, **settings},
              "data": {split: size_class_counts(json.loads(coco_paths(root, split)[1]
                                                             .read_text()))
                       for split in ("train", "val")},
              "runs": [], "pending": [f"{r[0]}/seed{s}" for r, s in order],
              "paper": PAPER}
    result["machine"]["torch_threads"] = settings["threads"] or torch.get_num_threads()
    return result


class ResultRecorder:
    """Writes the results file at the start and after every finished or failed run
    (the callbacks of ``run_jobs``), keeping the runs in RUNS' order."""

    def __init__(self, result, out_dir):
        self.result, self.out_dir = result, out_dir
        self.known = [r[0] for r in RUNS]
        self.start = time.perf_counter()
        write_results(result, out_dir)

    def finished(self, record):
        if record is None:              # skipped: started too late (stays "pending")
            return
        result = self.result
        result["runs"].append(record)
        result["runs"].sort(key=lambda r: (self.known.index(r["model"]), r["seed"]))
        result["pending"].remove(f"{record['model']}/seed{record['seed']}")
        if record.get("compact"):
            target = self.out_dir / COMPACT_NAME
            Path(record["compact"]).replace(target)
            record["compact"] = str(target)
        result["load_average"]["end"] = load_average()
        result["wall_total_s"] = round(time.perf_counter() - self.start, 1)
        write_results(result, self.out_dir)
        print(f"done {record['model']} seed {record['seed']}: {record['steps']} steps, "
              f"{record['wall_s']:.0f} s, AP {record['evals'][-1]['AP']:.4f}", flush=True)

    def failed(self, args, error):
        name, seed = args[0], args[3]
        self.result.setdefault("failed", []).append(f"{name}/seed{seed}: {error!r}")
        write_results(self.result, self.out_dir)

