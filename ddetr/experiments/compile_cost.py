"""torch.compile on the CPU training step: does its compile time pay for itself inside a
time budget? ``python -m ddetr bench compile``.

The step is the engine's (``ddetr.engine.train``: ``prepare_model``,
``build_optimizer``, ``train_step``), once with the model as it is ("eager") and once
wrapped in ``torch.compile`` (TorchInductor, default mode); the criterion (the Hungarian
matching runs on the host) stays eager either way. Both get the same seeded weights and
the same batches: the first ``batches`` batches of the preset's own training loader, so
the compiler meets what a run gives it (image sizes that vary from batch to batch, a
number of denoising queries that follows the number of objects). Each model runs those
batches twice, in order: the first pass includes what the first sight of each shape
costs (for the compiled model: tracing, compiling and recompiling; for both: the
kernels oneDNN builds), the second pass is steady. The compile time is the compiled
model's first-pass excess over its second pass, less the eager model's (which both
pay). In a budget of ``budget_min`` minutes the eager step trains budget / step
batches; the compiled one (budget - compile time) / step. A run meets more shapes than
these batches hold, and each may recompile, so the compiled side's count is an upper
bound.

Results: ``<out>/compile_cost.json`` and a block in ``<out>/train_step.md``.
"""
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from ..config import parse_overrides
from ..engine.train import (build_loaders, build_optimizer, prepare_model, seed_everything,
                            train_step)
from ..models import build_model
from .machine import load_average, provenance
from .markdown_block import write_block
from .train_profile_cpu import precision_configs


def loader_batches(cfg, count):
    """The first `count` batches of cfg's training loader (epoch 0), collated."""
    loader = build_loaders(cfg)[1]
    loader.batch_sampler.sampler.set_epoch(0)
    return list(itertools.islice(loader, count))


def timed_passes(cfg, batches, compiled):
    """Seconds of every step of two passes over `batches`: ([first], [second])."""
    device = torch.device("cpu")
    seed_everything(cfg.seed)
    model, criterion, _ = build_model(cfg)
    model = prepare_model(model, device).train()
    optimizer = build_optimizer(model, cfg)
    run = torch.compile(model) if compiled else model
    passes = []
    for _ in range(2):
        times = []
        for batch in batches:
            start = time.perf_counter()
            train_step(run, criterion, optimizer, batch, device, cfg)
            times.append(time.perf_counter() - start)
        passes.append(times)
    return passes


def bench_compile(out_dir="benchmarks", config="cpu", batches=12, budget_min=15.0,
                  overrides=None, command=None):
    """Time eager and compiled steps on the loader's first batches; write
    ``compile_cost.json`` and the block in ``train_step.md``; return the result."""
    if batches < 1 or budget_min <= 0:
        raise ValueError(f"batches expects >= 1 and budget_min > 0, got batches={batches}, "
                         f"budget_min={budget_min}")
    overrides = parse_overrides(overrides)
    cfg = precision_configs(config, overrides)[-1]   # the precision the preset trains in
    data = loader_batches(cfg, batches)
    result = {**provenance(command, "cpu"), "config": config, "overrides": overrides,
              "precision": "bfloat16" if cfg.amp else "float32",
              "batch_size": cfg.batch_size, "batches": len(data),
              "image_sizes": sorted({tuple(b[0].shape[-2:]) for b in data}),
              "threads": torch.get_num_threads(), "budget_min": budget_min}
    for name in ("eager", "compiled"):
        first, second = timed_passes(cfg, data, name == "compiled")
        result[name] = {"first_pass_s": [round(t, 3) for t in first],
                        "second_pass_s": [round(t, 3) for t in second],
                        "steady_ms": round(1e3 * statistics.mean(second), 1),
                        "first_pass_excess_s": round(sum(first) - sum(second), 1)}
        print(f"{name}: first pass {sum(first):.1f} s, steady {result[name]['steady_ms']} "
              f"ms/step", flush=True)
    result.update(budget_images(result, budget_min))
    result["load_average_at_end"] = load_average()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    write_block(out / "train_step.md", "compile_cost", compile_table(result))
    return result


def budget_images(result, budget_min):
    """The compile time, the steady speed-up and the images a budget trains each way."""
    eager, compiled = result["eager"], result["compiled"]
    compile_s = max(0.0, compiled["first_pass_excess_s"] - eager["first_pass_excess_s"])
    budget_s, batch = 60 * budget_min, result["batch_size"]
    return {"compile_s": round(compile_s, 1),
            "steady_speedup": round(eager["steady_ms"] / compiled["steady_ms"], 3),
            "budget_images_eager": int(budget_s / eager["steady_ms"] * 1e3) * batch,
            "budget_images_compiled": max(0, int((budget_s - compile_s)
                                                 / compiled["steady_ms"] * 1e3)) * batch}


def compile_table(result):
    """Markdown: the command, the machine and the two ways' figures."""
    m = result["machine"]
    e, c = result["eager"], result["compiled"]
    sizes = ", ".join(f"{h}x{w}" for h, w in result["image_sizes"])
    return "\n".join([
        "## torch.compile against the eager step (CPU)", "",
        "Written by `python -m ddetr bench compile` (ddetr/experiments/compile_cost.py, "
        "which explains the method): the engine's step, eager and compiled, over the same "
        "batches of the preset's loader, two passes each in one process.", "",
        f"{m['cpu']}, {m['cpu_cores']} cores, native bfloat16: {m['native_bf16']}, "
        f"torch {m['torch']}, {result['threads']} threads; load average "
        f"{result['load_average_at_start']} at the start.  ",
        f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`"
        + (" (with uncommitted changes)" if result["uncommitted_changes"] else "") + "  ",
        f"Preset `{result['config']}` in {result['precision']}, {result['batches']} "
        f"batches of {result['batch_size']} ({sizes} padded sizes).", "",
        "| | first pass (s) | steady ms/step | images in a "
        f"{result['budget_min']:g}-minute budget |", "|---|---:|---:|---:|",
        f"| eager | {sum(e['first_pass_s']):.1f} | {e['steady_ms']} | "
        f"{result['budget_images_eager']:,} |",
        f"| compiled | {sum(c['first_pass_s']):.1f} | {c['steady_ms']} | "
        f"{result['budget_images_compiled']:,} |", "",
        f"Compile time {result['compile_s']} s; steady speed-up "
        f"{result['steady_speedup']:.2f}x."])
