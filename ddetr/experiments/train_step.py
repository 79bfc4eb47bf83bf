"""Training-step throughput and memory: ``python -m ddetr bench train``.

Times the engine's own training step (``ddetr.engine.train_one_epoch``: forward under
autocast when amp is on, the matching loss, backward, gradient clipping, AdamW) for one
preset at a fixed image size, once for every attention backend and mixed-precision
setting asked for, and records images per second and peak memory:

    python -m ddetr bench train --device cuda                # paper preset, 800x1066
    python -m ddetr bench train --device cpu --config cpu --size 256x256

The batches are random images of the given size, each with a few random boxes and
labels: what a step costs does not depend on what the pixels show, and drawing them
keeps data loading out of the measurement (``python -m ddetr train`` measures whole
epochs). Each setting gets a fresh model with the same seed, ``warmup`` untimed steps
(the kernel builds, cuDNN's choices, the allocator's pools) and then ``iters`` timed
ones. The step reads the loss back every iteration, so the wall clock measures
finished GPU work. Peak memory on a GPU is ``max_memory_allocated`` over the timed
steps; on a CPU it is not measured.

Results go to ``<out>/train_step_<device>.json`` and ``<out>/train_step.md`` with the
command, commit and machine.
"""
import json
import time
from pathlib import Path

import torch

from ..config import get_config, parse_overrides
from ..engine.precision import autocast_dtype, needs_grad_scaler
from ..engine.train import (build_optimizer, prepare_model, resolve_device, seed_everything,
                            train_one_epoch)
from ..models import build_model
from .machine import git_commit, load_average, machine_description
from .markdown_block import write_block

BACKENDS = ("reference", "kernel", "triton")
DEFAULT_BACKENDS = {"cpu": ("reference", "kernel"), "cuda": ("kernel", "triton")}


def random_batch(batch_size, height, width, num_classes, seed=0, boxes_per_image=6):
    """(images (N, 3, H, W), masks (N, H, W) all False, targets) like collate's output:
    each target has "labels" (T,) in 1..num_classes-1 and "boxes" (T, 4) normalised
    (cx, cy, w, h), plus the sizes."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, height, width, generator=gen)
    masks = torch.zeros(batch_size, height, width, dtype=torch.bool)
    targets = []
    for i in range(batch_size):
        centres = torch.rand(boxes_per_image, 2, generator=gen) * 0.6 + 0.2
        sizes = torch.rand(boxes_per_image, 2, generator=gen) * 0.3 + 0.05
        targets.append({"labels": torch.randint(1, num_classes, (boxes_per_image,),
                                                generator=gen),
                        "boxes": torch.cat([centres, sizes], 1),
                        "orig_size": torch.tensor([height, width]),
                        "size": torch.tensor([height, width]), "image_id": i})
    return images, masks, targets


def step_runner(cfg, batch):
    """A function n -> the engine's training loop (train_one_epoch) over n copies of
    ``batch``, for a fresh model of cfg with the seed's weights; returns the epoch's
    EpochResult."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model, criterion, _ = build_model(cfg)
    model = prepare_model(model, device)
    criterion.to(device)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, cfg.amp))
    return lambda n: train_one_epoch(model, criterion, [batch] * n, optimizer, device, 0,
                                     cfg, scaler=scaler, progress=False)


def time_train_step(cfg, batch, iters=10, warmup=3):
    """{"images_per_s", "step_ms", "peak_MB" (None on a CPU), "loss"} of cfg's model
    trained on ``batch`` (random_batch's) for warmup + iters steps."""
    device = resolve_device(cfg.device)
    steps = step_runner(cfg, batch)
    steps(warmup)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = steps(iters)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    images = iters * batch[0].shape[0]
    return {"images_per_s": round(images / seconds, 3),
            "step_ms": round(seconds / iters * 1e3, 2),
            "peak_MB": None if peak is None else round(peak, 1),
            "loss": round(result.losses["loss"], 4)}


def bench_train_step(out_dir="benchmarks", config="paper", device=None, batch_size=2,
                     size=(800, 1066), backends=None, amp=(False, True),
                     iters=10, warmup=3, overrides=None, command=None):
    """Measure every (backend, amp) setting, write the results, return them.

    Args:
        config: a preset name or YAML file; overrides: a dict or "key=value" list on top
            of it (every key checked).
        device: "cpu" or "cuda" (None: cuda if available).
        size: (height, width) of the images; batch_size: images per step, or a list
            of batch sizes to measure each setting at.
        backends: attention backends (BACKENDS; None: DEFAULT_BACKENDS of the device);
        amp: mixed-precision settings.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = tuple(backends or DEFAULT_BACKENDS.get(device, ()))
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ValueError(f"backends must be some of {list(BACKENDS)}, got {list(backends)}")
    if "triton" in backends and device != "cuda":
        raise ValueError("backend 'triton' runs on a GPU only (device='cuda'), "
                         f"got device={device!r}")
    height, width = size
    sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
    if not sizes or min(*sizes, height, width, iters) < 1 or warmup < 0:
        raise ValueError(f"batch_size, size, iters expect >= 1 and warmup >= 0, got "
                         f"batch_size={batch_size}, size={size}, iters={iters}, "
                         f"warmup={warmup}")
    return _measure_all(out_dir, config, device, sizes, size, backends, amp, iters, warmup,
                        parse_overrides(overrides), command)


def _measure_all(out_dir, config, device, sizes, size, backends, amp, iters, warmup,
                 overrides, command):
    """bench_train_step after its checks: every setting timed, the files written."""
    height, width = size
    base = {**overrides, "device": device, "iters_per_epoch": 0}
    cfgs = {(n, b, a): get_config(config, {**base, "batch_size": n, "attention_backend": b,
                                           "amp": a})
            for n in sizes for b in backends for a in amp}  # all checked before any runs
    commit, dirty = git_commit()
    result = {"command": command, "commit": commit, "uncommitted_changes": dirty,
              "machine": machine_description(device), "load_average_at_start": load_average(),
              "config": config, "overrides": overrides, "batch_sizes": sizes,
              "size": [height, width], "iters": iters, "warmup": warmup, "runs": []}
    print(f"training step of {config!r} on {device}, batches of {sizes} at {height}x{width}, "
          f"{warmup} + {iters} steps per setting")
    batches = {}
    for (n, backend, use_amp), cfg in cfgs.items():
        if n not in batches:
            batches = {n: random_batch(n, height, width, cfg.num_classes)}
            if device == "cuda":  # as the training loaders give it: pinned
                batches[n] = torch.utils.data._utils.pin_memory.pin_memory(batches[n])
        batch = batches[n]
        half = autocast_dtype(resolve_device(device)) if use_amp else None
        row = {"batch_size": n, "backend": backend, "amp": use_amp,
               "autocast_dtype": None if half is None else str(half).replace("torch.", ""),
               **time_train_step(cfg, batch, iters, warmup)}
        result["runs"].append(row)
        print(f"  {backend:>9} amp={str(use_amp):5} ({row['autocast_dtype'] or 'float32'}): "
              f"{row['images_per_s']:7.2f} images/s, {row['step_ms']:8.1f} ms/step, "
              f"peak {row['peak_MB'] if row['peak_MB'] is not None else '-'} MB")
        if device == "cuda":
            torch.cuda.empty_cache()
    result["load_average_at_end"] = load_average()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_step_{device}.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(out)
    return result


def write_markdown(out_dir):
    """The "train_step" block of ``<out_dir>/train_step.md`` from every
    train_step_<device>.json there."""
    out = Path(out_dir)
    lines = ["# The training step: images per second and peak memory", "",
             "Written by `python -m ddetr bench train` (ddetr/experiments/train_step.py, "
             "which explains the method): the engine's training step on random images, "
             "per attention backend and mixed-precision setting.", ""]
    for path in sorted(out.glob("train_step_*.json")):
        r = json.loads(path.read_text())
        m = r["machine"]
        where = m.get("gpu") or (f"{m['cpu']}, {m['cpu_cores']} cores, native bfloat16: "
                                 f"{m.get('native_bf16', 'not recorded')}")
        lines += [f"## {where}, torch {m['torch']}", "",
                  f"Command: `{r['command']}`  ", f"Commit: `{r['commit']}`"
                  + (" (with uncommitted changes)" if r["uncommitted_changes"] else "") + "  ",
                  *([r["provenance"] + "  "] if r.get("provenance") else []),
                  f"Preset `{r['config']}` with {r['overrides'] or 'no overrides'}, images "
                  f"of {r['size'][0]}x{r['size'][1]}, {r['warmup']} untimed + "
                  f"{r['iters']} timed steps per row", "",
                  "| batch | backend | amp | images/s | ms/step | peak MB | loss |",
                  "|---:|---|---|---:|---:|---:|---:|"]
        for row in r["runs"]:
            lines.append(f"| {row.get('batch_size', r.get('batch_size'))} | "
                         f"{row['backend']} | {row['autocast_dtype'] or 'off'} | "
                         f"{row['images_per_s']:.2f} | {row['step_ms']:.1f} | "
                         f"{'-' if row['peak_MB'] is None else row['peak_MB']} | "
                         f"{row['loss']:.3f} |")
        lines.append("")
    path = out / "train_step.md"      # its own block: the speed-up's block stays
    write_block(path, "train_step", "\n".join(lines))
    return path
