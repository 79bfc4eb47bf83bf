"""Where a training step's time goes on a GPU: ``python -m ddetr bench profile``.

Runs the engine's training step (``time_train_step``'s setting: one preset, random
images of one size, per mixed-precision setting) and records, per step:

* the host syncs: ``torch.cuda.set_sync_debug_mode("warn")`` makes every call that waits
  for the GPU (``.item()``, ``.cpu()``, a copy from pageable memory, ...) warn; they are
  counted by the line of code that caused them;
* the GPU busy fraction: the summed time of the GPU's kernels and copies over the wall
  time (torch.profiler), and the CUDA runtime calls (kernel launches, copies, syncs);
* the top kernels and operators by GPU time (torch.profiler's table).

A step whose GPU is busy a small fraction of the time is bound by the host (Python,
kernel launches, syncs), not by the GPU's arithmetic. Results go to
``<out>/train_profile_cuda.json`` and the tables to ``<out>/train_profile_cuda.md``.
"""
import collections
import json
import time
import warnings
from pathlib import Path

import torch

from ..config import get_config, parse_overrides
from .machine import git_commit, machine_description
from .train_step import random_batch, step_runner

RUNTIME_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel",
                 "cuLaunchKernelEx", "cudaMemcpyAsync", "cudaStreamSynchronize",
                 "cudaDeviceSynchronize", "cudaEventSynchronize")


def sync_sites(run):
    """{file:line: syncs} of one step, from torch's sync debug warnings."""
    sites = collections.Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{w.filename}:{w.lineno}"] += 1
    return sites


def profile_steps(run, steps):
    """(busy fraction and per-step figures, the profiler's table) over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run(steps)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
    calls = {e.key: e.count / steps for e in events if e.key in RUNTIME_CALLS}
    table = events.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    return dict(wall_ms_per_step=wall / steps * 1e3, gpu_busy_ms_per_step=gpu / steps * 1e3,
                gpu_busy_fraction=gpu / wall, runtime_calls_per_step=calls), table


def profile_train_step(out_dir="benchmarks", config="paper", batch_size=2, size=(800, 1066),
                       amp=(False, True), steps=3, overrides=None, command=None):
    """Profile the training step on the GPU per amp setting; write and return the result."""
    if not torch.cuda.is_available():
        raise ValueError("bench profile measures a GPU, and torch sees no CUDA device")
    overrides = parse_overrides(overrides)
    cfgs = {a: get_config(config, {**overrides, "device": "cuda", "batch_size": batch_size,
                                   "amp": a, "iters_per_epoch": 0}) for a in amp}
    batch = random_batch(batch_size, *size, next(iter(cfgs.values())).num_classes)
    batch = torch.utils.data._utils.pin_memory.pin_memory(batch)
    commit, dirty = git_commit()
    result = {"command": command, "commit": commit, "uncommitted_changes": dirty,
              "machine": machine_description("cuda"), "config": config,
              "overrides": overrides, "batch_size": batch_size, "size": list(size),
              "steps": steps, "runs": []}
    tables = []
    for use_amp, cfg in cfgs.items():
        run = step_runner(cfg, batch)
        run(3)                                            # warm-up: builds, cuDNN, pools
        sites = sync_sites(run)
        figures, table = profile_steps(run, steps)
        result["runs"].append({"amp": use_amp, "syncs_per_step": sum(sites.values()),
                               "sync_sites": sites.most_common(), **figures})
        tables.append((use_amp, table))
        print(f"amp={use_amp}: {figures['gpu_busy_fraction']:.0%} GPU busy, "
              f"{figures['wall_ms_per_step']:.1f} ms/step, {sum(sites.values())} syncs/step")
        torch.cuda.empty_cache()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_profile_cuda.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(out, result, tables)
    return result


def write_markdown(out, result, tables):
    """``<out>/train_profile_cuda.md``: the figures, the sync sites, the tables."""
    m = result["machine"]
    lines = ["# Where the training step's time goes (GPU)", "",
             "Written by `python -m ddetr bench profile` (ddetr/experiments/train_profile.py, "
             "which explains the method).", "",
             f"{m.get('gpu')}, torch {m['torch']}. Command: `{result['command']}`  ",
             f"Commit: `{result['commit']}`" + (" (with uncommitted changes)"
                                                if result["uncommitted_changes"] else ""), "",
             f"Preset `{result['config']}`, batch {result['batch_size']} of "
             f"{result['size'][0]}x{result['size'][1]}, {result['steps']} profiled steps.", ""]
    for run, (_, table) in zip(result["runs"], tables):
        calls = ", ".join(f"{k} {v:.0f}" for k, v in run["runtime_calls_per_step"].items())
        sites = "; ".join(f"{site.split('/ddetr/')[-1]} x{n}" for site, n in run["sync_sites"])
        lines += [f"## amp {'on' if run['amp'] else 'off'}", "",
                  f"- {run['wall_ms_per_step']:.1f} ms per step (profiled), GPU busy "
                  f"{run['gpu_busy_ms_per_step']:.1f} ms ({run['gpu_busy_fraction']:.0%})",
                  f"- host syncs per step: {run['syncs_per_step']} ({sites or 'none'})",
                  f"- CUDA runtime calls per step: {calls}", "", "```", table, "```", ""]
    (out / "train_profile_cuda.md").write_text("\n".join(lines))
