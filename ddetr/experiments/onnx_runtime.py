"""ONNX Runtime against PyTorch on the CPU: ``python -m ddetr bench onnx``.

For each preset the model is built with random weights (seed 0; what a forward pass
costs does not depend on the weights' values), exported once with
``ddetr.engine.export_onnx`` (checked against PyTorch as always) and then timed at
each image size asked for, one image per call, with every runtime on the same number
of threads:

    onnx       the exported graph in ONNX Runtime (its deformable attention is the
               reference's GridSample graph)
    reference  the same PyTorch module with backend="reference" (grid_sample)
    fused      the same PyTorch module with the fused C++ kernel (backend="kernel")

The three take turns, one warm-up call each and then ``repeat`` timed rounds, so that
the ratios compare runs on the same machine at the same time (absolute times move with
whatever else the machine runs; the load averages are recorded). Each timed call is the
whole graph: normalisation, model, postprocessing.

    python -m ddetr bench onnx --threads 2
    python -m ddetr bench onnx --cases cpu:256x256 --repeat 3

Results go to ``<out>/onnx_cpu.json`` and ``<out>/onnx.md``, with the command, commit,
machine and the export's measured differences.
"""
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..config import get_config
from ..engine.precision import cpu_has_native_bf16
from ..engine.export_onnx import (Detector, attention_backend, check_images, export_onnx,
                                  image_batch, onnx_session, run_onnx, run_torch)
from ..models import build_model
from .machine import git_commit, load_average, machine_description

RUNTIMES = ("onnx", "reference", "fused")


def bench_onnx(out_dir, cases, threads=2, repeat=5, command=None):
    """Time every (preset, (H, W)) case, write the results, return them."""
    presets = list(dict.fromkeys(p for p, _ in cases))
    cfgs = {p: get_config(p) for p in presets}            # every preset checked first
    torch.set_num_threads(threads)
    commit, dirty = git_commit()
    result = {"command": command, "commit": commit, "uncommitted_changes": dirty,
              "machine": {**machine_description("cpu"), "bf16_native": cpu_has_native_bf16()},
              "threads": threads, "repeat": repeat,
              "onnxruntime": onnxruntime_version(), "load_average_at_start": load_average(),
              "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in presets:
            torch.manual_seed(0)
            model, _, post = build_model(cfgs[preset])
            model.eval()
            sizes = [s for p, s in cases if p == preset]
            start = time.perf_counter()
            report = export_onnx(model, post, cfgs[preset], Path(tmp) / f"{preset}.onnx",
                                 size=sizes[0], threads=threads)
            export_s = time.perf_counter() - start
            session = onnx_session(report["path"], threads)
            for size in sizes:
                row = {"preset": preset, "size": list(size), "export_s": round(export_s, 1),
                       "checks": report["checks"],
                       **time_runtimes(model, post, session, size, repeat)}
                result["runs"].append(row)
                print(f"{preset} {size[0]}x{size[1]}: " + ", ".join(
                    f"{k} {row['ms'][k]:.0f} ms" for k in RUNTIMES))
    result["load_average_at_end"] = load_average()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "onnx_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(out)
    return result


def onnxruntime_version():
    import onnxruntime
    return onnxruntime.__version__


def time_runtimes(model, postprocessor, session, size, repeat):
    """{"ms": {runtime: median ms}, "min_ms": {...}} of one image of size (H, W)."""
    images, sizes = image_batch(check_images(None, size), size)
    detector = Detector(model, postprocessor).eval()

    def torch_on(backend):
        def run():
            with attention_backend(model, backend):
                run_torch(detector, images, sizes)
        return run

    calls = {"onnx": lambda: run_onnx(session, images, sizes),
             "reference": torch_on("reference"), "fused": torch_on("kernel")}
    times = {k: [] for k in RUNTIMES}
    for i in range(repeat + 1):
        for key in RUNTIMES:
            start = time.perf_counter()
            calls[key]()
            if i > 0:                                      # round 0 is the warm-up
                times[key].append(time.perf_counter() - start)
    return {"ms": {k: round(statistics.median(t) * 1e3, 1) for k, t in times.items()},
            "min_ms": {k: round(min(t) * 1e3, 1) for k, t in times.items()}}


def write_markdown(out_dir):
    """``<out_dir>/onnx.md`` from ``onnx_cpu.json``."""
    out = Path(out_dir)
    r = json.loads((out / "onnx_cpu.json").read_text())
    m = r["machine"]
    lines = ["# ONNX Runtime against PyTorch on a CPU", "",
             "Written by `python -m ddetr bench onnx` (ddetr/experiments/onnx_runtime.py, "
             "which explains the method): one image per call through the whole exported "
             "graph (normalisation, model, postprocessing), random weights, every runtime "
             f"on {r['threads']} threads, medians of {r['repeat']} rounds taken in turns. "
             "`onnx` is the exported graph in ONNX Runtime, `reference` and `fused` the "
             "PyTorch model with the grid_sample reference and the fused C++ kernel.", "",
             f"Machine: {m['cpu']}, {m['cpu_cores']} cores, bfloat16 "
             f"{ {True: 'native', False: 'not native'}.get(m.get('bf16_native'), 'not recorded')} "
             f"(every runtime computes in float32 here); torch {m['torch']}, onnxruntime "
             f"{r.get('onnxruntime', 'not recorded')}  ",
             f"Command: `{r['command']}`  ",
             f"Commit: `{r['commit']}`" + (" (with uncommitted changes)"
                                          if r["uncommitted_changes"] else "") + "  ",
             f"Load average (1, 5, 15 min) at start {r['load_average_at_start']}, at end "
             f"{r['load_average_at_end']}", "",
             "| preset | image | onnx ms | reference ms | fused ms | reference / onnx | "
             "fused / onnx | export s | largest difference (score, box) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in r["runs"]:
        ms = row["ms"]
        worst_score = max(c["score"] for c in row["checks"])
        worst_box = max(c["box"] for c in row["checks"])
        lines.append(f"| {row['preset']} | {row['size'][0]}x{row['size'][1]} | "
                     f"{ms['onnx']:.0f} | {ms['reference']:.0f} | {ms['fused']:.0f} | "
                     f"{ms['reference'] / ms['onnx']:.2f}x | {ms['fused'] / ms['onnx']:.2f}x | "
                     f"{row['export_s']:.0f} | {worst_score:.1e}, {worst_box:.1e} |")
    lines += ["", "A ratio above 1 means ONNX Runtime is faster. The differences are those "
              "of the export's own check (largest score difference; largest box-corner "
              "difference as a fraction of the image side), over its two checked batches.",
              "", "On a CPU that other processes share, PyTorch's times grow far more than "
              "ONNX Runtime's (its OpenMP threads spin-wait, benchmarks/contention.md), which "
              "skews the ratios towards ONNX Runtime: compare runs made at a low load "
              "average.", ""]
    path = out / "onnx.md"
    path.write_text("\n".join(lines))
    return path
