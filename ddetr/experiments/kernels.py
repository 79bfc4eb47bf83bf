"""The kernel benchmark (``python -m ddetr bench build | kernels``).

``build_kernel`` compiles (or finds cached) the fused operator and says what it built.

``bench_kernels`` times multi-scale deformable attention, the grid_sample reference
against the fused kernel, side by side in one run, at the three shapes of
``kernel_inputs`` (the book's CPU model, the paper's decoder and encoder). For each it
reports forward time and forward+backward time (median of ``repeat`` runs after one
warm-up, the two implementations taking turns) and peak memory, and the reference/fused
ratios.

Peak memory is measured per device as ``memory`` explains: on the CPU the extra
resident memory of one call in a fresh subprocess, on a GPU the extra allocated memory.

On a GPU the forward time is also compared with its bandwidth floor: the bytes the
forward must move at least (read value, locations and weights once, write the output)
divided by the device's memory bandwidth (theoretical, from the device properties, and
as measured by a large device-to-device copy), against the bare op's time from CUDA
events (no Python wrapper).

Results go to ``<out_dir>/kernels_<device>.json`` and the table ``<out_dir>/kernels.md``.
"""
import json
from pathlib import Path

import torch

from ..ops import kernel, toolchain
from .kernel_inputs import DESCRIPTIONS, SHAPES, forward_bytes, make_inputs, sizes_of
from .machine import load_average, machine_description
from .memory import cpu_peak_memory, cuda_peak_memory
from .timing import cuda_bandwidth, cuda_op_forward_seconds, implementation, time_side_by_side

IMPLS = ("reference", "kernel")


def build_kernel(cuda=False, verbose=False):
    """Build (or find cached) the fused operator and print what was built where.

    Args:
        cuda: build the CUDA part even without a GPU (needs nvcc); it is built anyway
            when a GPU is present.
        verbose: show the compiler's commands and output.

    Returns:
        True if every part that was tried loaded.
    """
    status = kernel.load_kernel(with_cuda=True if cuda else None, verbose=verbose)
    where = toolchain.build_directory() or "torch's default extensions folder " \
        "($TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)"
    print(f"build folder: {where}")
    for part in ("cpu", "cuda"):
        state = status[part]
        text = "built and loaded" if state is True else ("not requested" if state is None
                                                         else f"FAILED: {state}")
        seconds = status["seconds"].get(f"ddetr_msda_{part}")
        took = f" ({seconds:.1f} s)" if seconds is not None else ""
        print(f"{part:>4}: {text}{took}")
    return all(s in (True, None) for s in (status["cpu"], status["cuda"]))


def bench_kernels(out_dir, device=None, shapes=tuple(SHAPES), repeat=5, memory=True):
    """Measure (``measure_kernels``) and write ``<out_dir>/kernels_<device>.json``, then
    rewrite the table ``<out_dir>/kernels.md`` from every device's JSON there.

    Args:
        out_dir: the results folder (the CLI's default is benchmarks/ of the current
            directory).
        device: "cpu" or "cuda"; None: cuda if available, else cpu.
        shapes: names of SHAPES to measure.
        repeat: timed runs per case; memory: also measure peak memory.

    Returns:
        the result (the JSON's content).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = measure_kernels(device, shapes, repeat=repeat, memory=memory)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    table = write_markdown(out)
    print(f"\nwrote {path} and {table}")
    return result


def measure_kernels(device, names, repeat=5, memory=True):
    """Time (and measure the memory of) the reference and the fused kernel on `device`
    at the shapes `names`; returns the result of the JSON file (printing as it goes)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"shapes must be some of {list(SHAPES)}, got unknown {unknown}")
    status = kernel.load_kernel(with_cuda=(device == "cuda"))
    if status[device] is not True:
        raise kernel.KernelBuildError(f"the fused {device} kernel is not available: "
                                      f"{status[device]}")
    result = dict(device=device, machine=machine_description(device), repeat=repeat,
                  dtype="float32",
                  timing="median (and min) of repeat runs after one warm-up round; "
                         "reference and fused take turns",
                  memory=("CPU: extra peak RSS of one call (VmHWM after clear_refs, fresh "
                          "subprocess, inputs excluded)" if device == "cpu" else
                          "CUDA: max_memory_allocated during one call minus allocated "
                          "before (inputs excluded)"),
                  shapes={})
    if load_average() is not None:  # a busy machine slows both sides: say how busy it was
        result["load_average_at_start"] = load_average()
    if device == "cuda":
        theoretical, measured = cuda_bandwidth()
        result["bandwidth_GBps"] = dict(
            theoretical=None if theoretical is None else round(theoretical / 1e9, 1),
            measured_copy=round(measured / 1e9, 1))
    print(f"ms_deform_attn on {device}: {result['machine'].get('gpu') or result['machine']['cpu']}"
          f", {repeat} timed runs")
    for name in names:
        s = sizes_of(name)
        entry = dict(description=DESCRIPTIONS[name],
                     sizes={k: v for k, v in s.items() if k != "levels"},
                     levels=s["levels"], impls={})
        print(f"\n{name}: {DESCRIPTIONS[name]}  N={s['N']} S={s['S']} Lq={s['Lq']} "
              f"M={s['M']} D={s['D']} L={s['L']} K={s['K']}")
        impls = IMPLS + (("triton",) if device == "cuda" else ())  # Triton: GPUs only
        fns = {impl: implementation(impl) for impl in impls}
        inputs = make_inputs(name, device, requires_grad=True)
        with torch.no_grad():
            fwd = time_side_by_side(fns, inputs, False, repeat, device)
        fwd_bwd = time_side_by_side(fns, inputs, True, repeat, device)
        for impl, fn in fns.items():
            row = dict(forward_ms=fwd[impl][0] * 1e3, forward_backward_ms=fwd_bwd[impl][0] * 1e3,
                       forward_min_ms=fwd[impl][1] * 1e3,
                       forward_backward_min_ms=fwd_bwd[impl][1] * 1e3)
            if memory and device == "cuda":
                with torch.no_grad():
                    row["forward_peak_MB"] = _mb(cuda_peak_memory(fn, inputs, False))
                row["forward_backward_peak_MB"] = _mb(cuda_peak_memory(fn, inputs, True))
            entry["impls"][impl] = row
        del inputs
        for impl, row in entry["impls"].items():
            if memory and device == "cpu":  # in fresh subprocesses, one call each
                row["forward_peak_MB"] = _mb(cpu_peak_memory(name, impl, False))
                row["forward_backward_peak_MB"] = _mb(cpu_peak_memory(name, impl, True))
            print(f"  {impl:>9}: forward {row['forward_ms']:9.2f} ms   "
                  f"forward+backward {row['forward_backward_ms']:9.2f} ms"
                  + (f"   peak {row.get('forward_peak_MB')} / "
                     f"{row.get('forward_backward_peak_MB')} MB" if memory else ""))
        ref, fused = entry["impls"]["reference"], entry["impls"]["kernel"]
        entry["speedup"] = dict(
            forward=ref["forward_ms"] / fused["forward_ms"],
            forward_backward=ref["forward_backward_ms"] / fused["forward_backward_ms"])
        if memory and fused.get("forward_backward_peak_MB"):
            entry["memory_ratio"] = dict(
                forward=_ratio(ref.get("forward_peak_MB"), fused.get("forward_peak_MB")),
                forward_backward=_ratio(ref.get("forward_backward_peak_MB"),
                                        fused.get("forward_backward_peak_MB")))
        if device == "cuda":
            op_ms = cuda_op_forward_seconds(make_inputs(name, device)) * 1e3
            floor_bytes = forward_bytes(name)
            bw = result["bandwidth_GBps"]
            best_bw = bw["theoretical"] or bw["measured_copy"]
            floor_ms = floor_bytes / (best_bw * 1e9) * 1e3
            entry["bandwidth_floor"] = dict(
                bytes=floor_bytes, floor_ms=floor_ms, op_forward_ms=op_ms,
                fused_forward_over_floor=op_ms / floor_ms,
                floor_ms_measured_bandwidth=floor_bytes / (bw["measured_copy"] * 1e9) * 1e3)
            print(f"  forward bandwidth floor {floor_ms:.3f} ms; the bare op takes "
                  f"{op_ms:.3f} ms (CUDA events) = "
                  f"{entry['bandwidth_floor']['fused_forward_over_floor']:.2f}x the floor")
        print(f"  fused speed-up: forward {entry['speedup']['forward']:.1f}x, "
              f"forward+backward {entry['speedup']['forward_backward']:.1f}x"
              + (f"; memory {entry['memory_ratio']['forward_backward']:.1f}x lower"
                 if entry.get("memory_ratio", {}).get("forward_backward") else ""))
        result["shapes"][name] = entry
    if load_average() is not None:
        result["load_average_at_end"] = load_average()
    return result


def _mb(n):
    return None if n is None else round(n / 2**20, 1)


def _ratio(a, b):
    return None if not a or not b else a / max(b, 0.1)


# ---- the markdown table --------------------------------------------------------------------

def write_markdown(out_dir):
    """Write ``<out_dir>/kernels.md`` from every kernels_<device>.json in ``out_dir``;
    returns its path."""
    out = Path(out_dir)
    lines = ["# Fused multi-scale deformable attention: benchmarks", "",
             "Written by `python -m ddetr bench kernels` (ddetr/experiments/kernels.py), "
             "which explains the method. Reference = pure PyTorch (grid_sample), fused = "
             "the C++/CUDA kernel of ddetr/csrc/. float32; times are medians; peak memory is the extra "
             "memory one call needs beyond its inputs; ratios are reference / fused. "
             "Inputs as in the model: each query samples around its reference point "
             "(Gaussian offsets of 2 pixels), attention weights softmax-normalised.", ""]
    for device in ("cpu", "cuda"):
        path = out / f"kernels_{device}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        m = r["machine"]
        where = (f"{m['gpu']} (CUDA {m.get('cuda')})" if device == "cuda" else
                 f"{m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads")
        lines += [f"## {device.upper()}: {where}", "",
                  f"torch {m['torch']}, {r['repeat']} timed runs per case. {r['memory']}.", ""]
        if "load_average_at_start" in r:
            lines += [f"Load average (1, 5, 15 min) at start {r['load_average_at_start']}, at "
                      f"end {r.get('load_average_at_end')}: with other jobs on the machine "
                      f"absolute times vary from run to run (the JSON also holds the fastest "
                      f"run of each case); reference and fused run side by side, so the "
                      f"ratios are the steadier numbers.", ""]
        if device == "cuda":
            bw = r.get("bandwidth_GBps", {})
            lines += [f"Bandwidth: {bw.get('theoretical')} GB/s theoretical, "
                      f"{bw.get('measured_copy')} GB/s measured (device copy).", ""]
        header = ("| shape | impl | forward ms | fwd+bwd ms | fwd peak MB | fwd+bwd peak MB |")
        lines += [header, "|---|---|---:|---:|---:|---:|"]
        for name, e in r["shapes"].items():
            sz = e["sizes"]
            label = (f"{name} (N={sz['N']}, S={sz['S']}, Lq={sz['Lq']}, M={sz['M']}, "
                     f"D={sz['D']}, L={sz['L']}, K={sz['K']})")
            for impl, row in e["impls"].items():
                lines.append(f"| {label if impl == 'reference' else ''} | "
                             f"{'fused' if impl == 'kernel' else impl} | "
                             f"{row['forward_ms']:.2f} | {row['forward_backward_ms']:.2f} | "
                             f"{row.get('forward_peak_MB', '-')} | "
                             f"{row.get('forward_backward_peak_MB', '-')} |")
            mem = e.get("memory_ratio") or {}
            ratio = (f"| | **ratio** | **{e['speedup']['forward']:.1f}x** | "
                     f"**{e['speedup']['forward_backward']:.1f}x** | "
                     f"{_fmt(mem.get('forward'))} | {_fmt(mem.get('forward_backward'))} |")
            lines.append(ratio)
            if "bandwidth_floor" in e:
                f = e["bandwidth_floor"]
                lines.append(f"| | bandwidth floor (bare op) | {f['floor_ms']:.3f} "
                             f"({f['op_forward_ms']:.3f} = "
                             f"{f['fused_forward_over_floor']:.2f}x) | | | |")
        lines.append("")
    path = out / "kernels.md"
    path.write_text("\n".join(lines))
    return path


def _fmt(x):
    return "-" if x is None else f"{x:.1f}x"
