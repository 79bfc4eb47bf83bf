"""Training throughput on a shared CPU: images per second of the cpu preset's training
iterations, alone and next to other busy processes, for each way of choosing threads.

    python -m ddetr bench contention        # -> benchmarks/contention.{json,md}

Each setting runs in its own process (OpenMP reads OMP_WAIT_POLICY when torch is
imported), one after the other: warm-up iterations, then `iters` timed ones through
the engine's own train_one_epoch. "Load" means `load` extra processes that spin in a
Python loop for the whole measurement; "two trainings" runs two measurements at once.
The settings: threads=N fixed (N = every core, the "before" rows: no tuner),
threads=0 (ddetr.engine.threads tunes the count while training), one thread,
OMP_WAIT_POLICY=PASSIVE (threads sleep instead of spinning), float32 instead of
bfloat16, and the data loading alone (the main process decodes and augments images).
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .machine import git_commit, load_average, machine_description
from .markdown_block import write_block

BUSY = "while True: pass"


def settings(cores):
    """[(name, load, env, overrides, copies)]: the measurements of the benchmark."""
    fixed = {"threads": cores}
    return [
        ("alone, all threads (before)", 0, {}, fixed, 1),
        ("alone, tuned (after)", 0, {}, {"threads": 0}, 1),
        ("alone, one thread", 0, {}, {"threads": 1}, 1),
        ("alone, passive wait", 0, {"OMP_WAIT_POLICY": "PASSIVE"}, fixed, 1),
        ("2 busy processes, all threads (before)", 2, {}, fixed, 1),
        ("2 busy processes, tuned (after)", 2, {}, {"threads": 0}, 1),
        ("2 busy processes, one thread", 2, {}, {"threads": 1}, 1),
        ("2 busy processes, passive wait", 2, {"OMP_WAIT_POLICY": "PASSIVE"}, fixed, 1),
        ("2 busy processes, all threads, float32", 2, {}, {**fixed, "amp": False}, 1),
        ("two trainings at once, all threads (before)", 0, {}, fixed, 2),
        ("two trainings at once, tuned (after)", 0, {}, {"threads": 0}, 2),
    ]


def _child(overrides, iters, warmup):
    """In the measuring process: train iters iterations, print one JSON line."""
    import torch

    from ..config import get_config
    from ..engine.threads import ThreadTuner
    from ..engine.train import (build_loaders, build_optimizer, prepare_model,
                                seed_everything, train_one_epoch)
    from ..models import build_model

    overrides = dict(overrides)
    data_only = overrides.pop("data_only", False)
    cfg = get_config("cpu", {"output_dir": "runs/contention", **overrides})
    device = torch.device("cpu")
    seed_everything(cfg.seed)
    model, criterion, _ = build_model(cfg)
    model = prepare_model(model, device)
    optimizer = build_optimizer(model, cfg)
    _, loader, _, _ = build_loaders(cfg)
    tuner = ThreadTuner.for_config(cfg, device)    # on a CPU: never None
    # measured from the tuner's first choice on: its warm-up and first probes come first
    cfg.iters_per_epoch = max(warmup, tuner.settle_iterations)
    if data_only:
        t0, n = time.perf_counter(), 0
        for i, (imgs, _, _) in enumerate(loader):
            if i == iters:
                break
            n += imgs.shape[0]
        print(json.dumps({"images_per_s": n / (time.perf_counter() - t0)}), flush=True)
        return
    train_one_epoch(model, criterion, loader, optimizer, device, 0, cfg, progress=False,
                    hooks=[tuner])
    tuner.take_counts()                           # the warm-up's are not measured
    cfg.iters_per_epoch = iters
    t0, c0 = time.perf_counter(), time.process_time()
    out = train_one_epoch(model, criterion, loader, optimizer, device, 1, cfg,
                          progress=False, hooks=[tuner])
    wall = time.perf_counter() - t0
    print(json.dumps({"images_per_s": out.images_per_s,
                      "cpu_per_wall": (time.process_time() - c0) / wall,
                      "threads": tuner.take_counts()}), flush=True)


def measure(load, env, overrides, copies, iters, warmup):
    """Run `copies` measuring processes next to `load` busy ones; their JSON results."""
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
    try:
        cmd = [sys.executable, "-m", "ddetr.experiments.contention", json.dumps(overrides),
               str(iters), str(warmup)]
        procs = [subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                  text=True) for _ in range(copies)]
        outs = [p.communicate()[0] for p in procs]
    finally:
        for b in busy:
            b.kill()
            b.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a measuring process failed: {overrides}, {env}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def bench_contention(out_dir="benchmarks", iters=40, warmup=5):
    """Measure every setting; write contention.json and contention.md to out_dir."""
    import torch

    from ..config import get_config

    cores = torch.get_num_threads()
    commit, dirty = git_commit()
    result = {"benchmark": "training throughput of the cpu preset on a shared CPU",
              "command": f"python -m ddetr bench contention --iters {iters}",
              "commit": commit, "uncommitted_changes": dirty,
              "machine": machine_description("cpu"), "load_average_before": load_average(),
              "batch_size": get_config("cpu").batch_size, "iters": iters, "warmup": warmup,
              "results": []}
    data = measure(0, {}, {"data_only": True}, 1, iters, 0)[0]
    result["data_loading_images_per_s"] = round(data["images_per_s"], 2)
    for name, load, env, overrides, copies in settings(cores):
        t0 = time.perf_counter()
        runs = measure(load, env, overrides, copies, iters, warmup)
        row = {"setting": name, "busy_processes": load, "env": env, "overrides": overrides,
               "trainings": copies, "images_per_s": [round(r["images_per_s"], 2) for r in runs],
               "cpu_per_wall": [round(r["cpu_per_wall"], 2) for r in runs],
               "threads_used": [r["threads"] for r in runs],
               "seconds": round(time.perf_counter() - t0, 1)}
        result["results"].append(row)
        print(f"{name}: {row['images_per_s']} images/s", flush=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "contention.json").write_text(json.dumps(result, indent=1) + "\n")
    write_block(out / "contention.md", "contention", contention_table(result),
                title=result["benchmark"])
    return result


def contention_table(result):
    """Markdown: one row per setting, images/s and the share of the idle speed."""
    rows = result["results"]
    alone = rows[0]["images_per_s"][0]
    m = result["machine"]
    lines = [f"    {result['command']}", "",
             f"Commit {result['commit'][:7] if result['commit'] else 'unknown'}; {m['cpu']}, "
             f"{m['cpu_cores']} cores, torch {m['torch']}; load average before "
             f"{result['load_average_before']}. {result['iters']} timed iterations of "
             f"batch {result['batch_size']} after {result['warmup']} warm-up ones (tuned "
             f"settings: at least until the tuner's first choice), each "
             f"setting in its own process. Data loading alone (main process): "
             f"{result['data_loading_images_per_s']} images/s.", "",
             "| setting | images/s | of 'alone, all threads' | CPU time / wall time | "
             "iterations per thread count |", "|---|---|---|---|---|"]
    for r in rows:
        speeds = " + ".join(f"{v:.2f}" for v in r["images_per_s"])
        share = " + ".join(f"{v / alone:.0%}" for v in r["images_per_s"])
        used = "; ".join(json.dumps(t) for t in r["threads_used"])
        cpu = " + ".join(f"{v:.2f}" for v in r["cpu_per_wall"])
        lines.append(f"| {r['setting']} | {speeds} | {share} | {cpu} | {used} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
