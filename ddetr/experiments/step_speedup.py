"""The training step now against the step before issue 32, side by side:
``python -m ddetr bench speedup``.

Issue 32 made the CPU training step faster; this measures by how much, as a ratio of
two steps timed in the same process, in alternating rounds, so that a shared machine's
drift affects both alike. "now" is the engine's own step (``ddetr.engine.train``:
``build_optimizer``, ``prepare_model``, ``train_step``); "before" is the same step with
each change undone (``BEFORE``): torch's default AdamW on a CPU (a Python loop over the
parameter tensors) instead of the fused one, and the backbone in the default (NCHW)
memory format. Both get the same seeded weights and the same random batch
(``train_step.random_batch``); each precision (float32, and bfloat16 autocast where the
processor has it natively) is a pair of its own.

Results: ``<out>/step_speedup.json`` and the table in ``<out>/train_step.md``'s block.
"""
import json
import statistics
import time
from pathlib import Path

import torch

from ..config import parse_overrides
from ..engine.train import (build_optimizer, param_groups, prepare_model, seed_everything,
                            train_step)
from ..engine.schedule import set_base_rates
from ..models import build_model
from .machine import load_average, provenance
from .markdown_block import write_block
from .train_profile_cpu import precision_configs
from .train_step import random_batch

BEFORE = ("torch's default AdamW on a CPU (a loop over the parameter tensors), "
          "not the fused one", "the backbone in NCHW, not channels_last")


def make_step(cfg, batch, before):
    """A function () -> None running one training step of a fresh seeded model, as the
    engine runs it now (before=False) or with issue 32's changes undone."""
    device = torch.device("cpu")
    seed_everything(cfg.seed)
    model, criterion, _ = build_model(cfg)
    if before:
        groups = param_groups(model, cfg)
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      foreach=False, fused=False)
        set_base_rates(optimizer, groups)
    else:
        model = prepare_model(model, device)
        optimizer = build_optimizer(model, cfg)
    model.train()
    return lambda: train_step(model, criterion, optimizer, batch, device, cfg)


def time_pair(cfg, batch, rounds, steps, warmup):
    """{"before_ms", "now_ms" (medians over rounds of the mean step), "ratio"}."""
    runs = {"before": make_step(cfg, batch, True), "now": make_step(cfg, batch, False)}
    for run in runs.values():
        for _ in range(warmup):
            run()
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(steps):
                run()
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    before, now = (statistics.median(times[k]) for k in ("before", "now"))
    return {"before_ms": round(before, 1), "now_ms": round(now, 1),
            "ratio": round(before / now, 3),
            "rounds_ms": {k: [round(t, 1) for t in v] for k, v in times.items()}}


def bench_step_speedup(out_dir="benchmarks", config="cpu", size=(256, 256), rounds=5,
                       steps=3, warmup=2, overrides=None, command=None):
    """Time "before" against "now" per precision; write ``step_speedup.json`` and the
    block in ``train_step.md``; return the result."""
    if min(rounds, steps, *size) < 1 or warmup < 0:
        raise ValueError(f"rounds, steps and size expect >= 1 and warmup >= 0, got "
                         f"rounds={rounds}, steps={steps}, size={size}, warmup={warmup}")
    overrides = parse_overrides(overrides)
    cfgs = precision_configs(config, overrides)
    result = {**provenance(command, "cpu"),
              "config": config, "overrides": overrides, "size": list(size),
              "rounds": rounds, "steps_per_round": steps, "warmup": warmup,
              "before": list(BEFORE), "runs": []}
    for cfg in cfgs:
        batch = random_batch(cfg.batch_size, *size, cfg.num_classes)
        row = {"precision": "bfloat16" if cfg.amp else "float32",
               **time_pair(cfg, batch, rounds, steps, warmup)}
        result["runs"].append(row)
        print(f"{row['precision']}: before {row['before_ms']} ms/step, now {row['now_ms']} "
              f"ms/step: {row['ratio']:.2f}x")
    result["load_average_at_end"] = load_average()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_speedup.json").write_text(json.dumps(result, indent=1) + "\n")
    write_block(out / "train_step.md", "step_speedup", speedup_table(result))
    return result


def speedup_table(result):
    """Markdown: the command, the machine and one row per precision."""
    m = result["machine"]
    lines = ["## Issue 32's step against the step before it (CPU)", "",
             "Written by `python -m ddetr bench speedup` (ddetr/experiments/step_speedup.py, "
             "which explains the method): the same step with the changes undone, timed in "
             "alternating rounds in one process.", "",
             f"{m['cpu']}, {m['cpu_cores']} cores, native bfloat16: {m['native_bf16']}, "
             f"torch {m['torch']}, {m['torch_threads']} threads; load average "
             f"{result['load_average_at_start']} at the start.  ",
             f"Command: `{result['command']}`  ", f"Commit: `{result['commit']}`"
             + (" (with uncommitted changes)" if result["uncommitted_changes"] else "")
             + "  ", "Before: " + "; ".join(result["before"]) + ".", "",
             f"Preset `{result['config']}`, batches of random {result['size'][0]}x"
             f"{result['size'][1]} images, {result['warmup']} untimed steps, then "
             f"{result['rounds']} rounds of {result['steps_per_round']} steps each way.", "",
             "| precision | before ms/step | now ms/step | speed-up |", "|---|---:|---:|---:|"]
    lines += [f"| {r['precision']} | {r['before_ms']} | {r['now_ms']} | {r['ratio']:.2f}x |"
              for r in result["runs"]]
    return "\n".join(lines)
