"""The kernel benchmark (``python -m ddetr bench build | kernels``).

``build_kernel`` compiles (or finds cached) the fused operator and says what it built.

``bench_kernels`` times multi-scale deformable attention, the grid_sample reference
against the fused kernel (and on a GPU the Triton kernel), side by side in one run, at
the three shapes of ``kernel_inputs`` (the book's CPU model, the paper's decoder and
encoder). For each it reports forward time and forward+backward time (median of
``repeat`` runs after one warm-up, the implementations taking turns; on a GPU from CUDA
events, with the L2 cache flushed before every call) and peak memory, and the
reference/fused ratios. On a GPU it measures float32 and then bfloat16 (a bfloat16
value with float32 locations and weights, as the model runs under autocast).

Peak memory is measured per device as ``memory`` explains: on the CPU the extra
resident memory of one call in a fresh subprocess, on a GPU the extra allocated memory.

On a GPU the forward time is also compared with floors, bytes over a bandwidth
(theoretical, from the device properties, and as measured by a large device-to-device
copy): the DRAM floor, the bytes the forward must move at least (read value, locations
and weights once, write the output); the gather floor, the bytes it moves if no corner
read is shared by two points; and the time to read every gathered corner from L2 (at
the bandwidth of a copy that stays in L2): a forward faster than that has the L1 cache
serving part of the corners. The fused ops are also timed bare (``timing.cuda_bare_ops``:
torch.ops.ddetr.* without autograd or the Python wrapper, back-to-back calls between
CUDA events, warm L2), which is the kernels' GPU time where the host enqueues a call
faster than the GPU runs it (the table says where it did not). With ``official`` (a
Deformable-DETR checkout) the official CUDA op is built at run time and timed beside
ddetr's, end to end and bare (float32: its kernels have no half types).

Results go to ``<out_dir>/kernels_<device>.json`` and the table ``<out_dir>/kernels.md``.
"""
import json
import sys
from pathlib import Path

import torch

from ..ops import kernel, toolchain
from .kernel_inputs import (DESCRIPTIONS, SHAPES, forward_bytes, gather_bytes, make_inputs,
                            sizes_of)
from .machine import git_commit, load_average, machine_description
from .memory import cpu_peak_memory, cuda_peak_memory
from .timing import (cuda_bandwidth, cuda_bare_ops, cuda_bare_seconds, implementation,
                     time_side_by_side)

IMPLS = ("reference", "kernel")
# the value types measured on each device (float32 first: the others are compared with it);
# the CPU kernel computes in float32 and float64 only
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}


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


def bench_kernels(out_dir, device=None, shapes=tuple(SHAPES), repeat=5, memory=True,
                  dtypes=None, official=None):
    """Measure (``measure_kernels``) and write ``<out_dir>/kernels_<device>.json``, then
    rewrite the table ``<out_dir>/kernels.md`` from every device's JSON there.

    Args:
        out_dir: the results folder (the CLI's default is benchmarks/ of the current
            directory).
        device: "cpu" or "cuda"; None: cuda if available, else cpu.
        shapes: names of SHAPES to measure.
        repeat: timed runs per case; memory: also measure peak memory.
        dtypes: names of value types, float32 first (None: every one of DTYPES[device]).
        official: a Deformable-DETR checkout: its CUDA op is built from it at run time
            (ddetr.experiments.official_op) and timed beside ddetr's (float32; GPU only).

    Returns:
        the result (the JSON's content).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = measure_kernels(device, shapes, repeat=repeat, memory=memory, dtypes=dtypes,
                             official=official)
    commit, dirty = git_commit()
    result.update(command="python -m ddetr " + " ".join(sys.argv[1:]), commit=commit,
                  uncommitted_changes=dirty)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    table = write_markdown(out)
    print(f"\nwrote {path} and {table}")
    return result


def measure_kernels(device, names, repeat=5, memory=True, dtypes=None, official=None):
    """Time (and measure the memory of) the reference and the fused kernels on `device`
    at the shapes `names`; returns the result of the JSON file (printing as it goes).

    Each shape's entry holds the float32 measurement (impls, speedup, on a GPU the
    floors); on a GPU each further dtype of ``dtypes`` adds an entry of the same form
    under its name, with ``over_float32``: how many times faster each implementation
    runs than in float32."""
    dtypes = _checked_request(device, names, dtypes, official)
    status = kernel.load_kernel(with_cuda=(device == "cuda"))
    if status[device] is not True:
        raise kernel.KernelBuildError(f"the fused {device} kernel is not available: "
                                      f"{status[device]}")
    result = _result_header(device, repeat, dtypes)
    impls = IMPLS + (("triton",) if device == "cuda" else ())  # Triton: GPUs only
    fns = {impl: implementation(impl) for impl in impls}
    if official is not None:
        from .official_op import load_official_op, official_ms_deform_attn
        load_official_op(official)
        fns["official"] = official_ms_deform_attn
        result["official_checkout"] = str(official)
    for name in names:
        s = sizes_of(name)
        entry = dict(description=DESCRIPTIONS[name],
                     sizes={k: v for k, v in s.items() if k != "levels"}, levels=s["levels"])
        print(f"\n{name}: {DESCRIPTIONS[name]}  N={s['N']} S={s['S']} Lq={s['Lq']} "
              f"M={s['M']} D={s['D']} L={s['L']} K={s['K']}")
        for dtype in dtypes:
            one = _measure_one(name, device, dtype, fns, repeat, memory, result)
            if dtype == "float32":
                entry.update(one)
            else:
                one["over_float32"] = {impl: entry["impls"][impl]["forward_backward_ms"]
                                       / row["forward_backward_ms"]
                                       for impl, row in one["impls"].items()}
                entry[dtype] = one
        result["shapes"][name] = entry
    if load_average() is not None:
        result["load_average_at_end"] = load_average()
    return result


def _checked_request(device, names, dtypes, official):
    """The dtypes to measure, after every argument is checked (before anything runs)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"shapes must be some of {list(SHAPES)}, got unknown {unknown}")
    dtypes = list(dtypes or DTYPES[device])
    if not dtypes or dtypes[0] != "float32" or not set(dtypes) <= set(DTYPES[device]):
        raise ValueError(f"dtypes on {device} must be float32 first, then some of "
                         f"{list(DTYPES[device][1:])}; got {dtypes}")
    if official is not None and device != "cuda":
        raise ValueError(f"--official times the official CUDA op: it needs device 'cuda', "
                         f"got {device!r}")
    return dtypes


def _result_header(device, repeat, dtypes):
    """The result's description of the machine and the method (and, on a GPU, the
    bandwidths the floors use), before any case is measured."""
    result = dict(device=device, machine=machine_description(device), repeat=repeat,
                  dtype="float32", dtypes=dtypes,
                  timing=("median (and min) of repeat runs after one warm-up round; "
                          "the implementations take turns" +
                          ("; CUDA events around each call, the L2 cache flushed before it"
                           if device == "cuda" else "")),
                  memory=("CPU: extra peak RSS of one call (VmHWM after clear_refs, fresh "
                          "subprocess, inputs excluded)" if device == "cpu" else
                          "CUDA: max_memory_allocated during one call minus allocated "
                          "before (inputs excluded)"),
                  shapes={})
    if load_average() is not None:  # a busy machine slows both sides: say how busy it was
        result["load_average_at_start"] = load_average()
    if device == "cuda":
        theoretical, measured, l2 = cuda_bandwidth()
        result["bandwidth_GBps"] = dict(
            theoretical=None if theoretical is None else round(theoretical / 1e9, 1),
            measured_copy=round(measured / 1e9, 1), measured_l2_copy=round(l2 / 1e9, 1))
    print(f"ms_deform_attn on {device}: {result['machine'].get('gpu') or result['machine']['cpu']}"
          f", {repeat} timed runs")
    return result


def _measure_one(name, device, dtype, fns, repeat, memory, result):
    """{"impls", "speedup", ["memory_ratio"], ["bandwidth_floor"]} of one shape and value
    dtype (a half value gets float32 locations and weights, as under autocast)."""
    value_dtype = getattr(torch, dtype)
    loc_dtype = torch.float32 if dtype in ("float16", "bfloat16") else None
    inputs = make_inputs(name, device, value_dtype, requires_grad=True, loc_dtype=loc_dtype)
    if dtype != "float32":  # the official op is written for float32 and float64
        fns = {impl: fn for impl, fn in fns.items() if impl != "official"}
    with torch.no_grad():
        fwd = time_side_by_side(fns, inputs, False, repeat, device)
    fwd_bwd = time_side_by_side(fns, inputs, True, repeat, device)
    one = {"impls": {}}
    for impl, fn in fns.items():
        row = dict(forward_ms=fwd[impl][0] * 1e3, forward_backward_ms=fwd_bwd[impl][0] * 1e3,
                   forward_min_ms=fwd[impl][1] * 1e3,
                   forward_backward_min_ms=fwd_bwd[impl][1] * 1e3)
        if memory and device == "cuda":
            with torch.no_grad():
                row["forward_peak_MB"] = _mb(cuda_peak_memory(fn, inputs, False))
            row["forward_backward_peak_MB"] = _mb(cuda_peak_memory(fn, inputs, True))
        one["impls"][impl] = row
    del inputs
    label = "" if dtype == "float32" else f" {dtype}"
    for impl, row in one["impls"].items():
        if memory and device == "cpu":  # in fresh subprocesses, one call each
            row["forward_peak_MB"] = _mb(cpu_peak_memory(name, impl, False))
            row["forward_backward_peak_MB"] = _mb(cpu_peak_memory(name, impl, True))
        print(f"  {impl:>9}{label}: forward {row['forward_ms']:9.3f} ms   "
              f"forward+backward {row['forward_backward_ms']:9.3f} ms"
              + (f"   peak {row.get('forward_peak_MB')} / "
                 f"{row.get('forward_backward_peak_MB')} MB" if memory else ""))
    ref = one["impls"]["reference"]
    one["speedup_by_impl"] = {impl: dict(forward=ref["forward_ms"] / row["forward_ms"],
                                         forward_backward=ref["forward_backward_ms"]
                                         / row["forward_backward_ms"])
                              for impl, row in one["impls"].items() if impl != "reference"}
    one["speedup"] = one["speedup_by_impl"]["kernel"]     # reference / the fused kernel
    fused = one["impls"]["kernel"]
    if memory and fused.get("forward_backward_peak_MB"):
        one["memory_ratio"] = dict(
            forward=_ratio(ref.get("forward_peak_MB"), fused.get("forward_peak_MB")),
            forward_backward=_ratio(ref.get("forward_backward_peak_MB"),
                                    fused.get("forward_backward_peak_MB")))
    if device == "cuda":
        one["bare"] = _bare_times(name, value_dtype, loc_dtype, "official" in fns)
        one["bandwidth_floor"] = _floors(name, value_dtype, loc_dtype, result,
                                         one["bare"]["CUDA"]["forward_ms"])
        f = one["bandwidth_floor"]
        print(f"  floors: DRAM {f['floor_ms']:.3f} ms, every corner from L2 "
              f"{f['l2_gather_ms']:.3f} ms; the bare op takes {f['op_forward_ms']:.3f} ms = "
              f"{f['fused_forward_over_floor']:.2f}x the DRAM floor")
        for impl, row in one["bare"].items():
            print(f"  bare {impl:>8}: forward {row['forward_ms']:.4f} ms, backward "
                  f"{row['backward_ms']:.4f} ms (GPU time, back-to-back calls)")
    print(f"  fused speed-up: forward {one['speedup']['forward']:.1f}x, "
          f"forward+backward {one['speedup']['forward_backward']:.1f}x"
          + (f"; memory {one['memory_ratio']['forward_backward']:.1f}x lower"
             if one.get("memory_ratio", {}).get("forward_backward") else ""))
    return one


def _bare_times(name, value_dtype, loc_dtype, with_official):
    """{"CUDA": cuda_bare_ops(...), ["official": the same for the official op]}."""
    inputs = make_inputs(name, "cuda", value_dtype, loc_dtype=loc_dtype)
    times = {"CUDA": cuda_bare_ops(inputs)}
    if with_official:
        from .official_op import official_module
        op = official_module()
        value, ss, lsi, loc, w = inputs
        grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3],
                           device="cuda")
        fwd = cuda_bare_seconds(lambda: op.ms_deform_attn_forward(value, ss, lsi, loc, w, 64))
        bwd = cuda_bare_seconds(lambda: op.ms_deform_attn_backward(value, ss, lsi, loc, w,
                                                                   grad, 64))
        times["official"] = dict(forward_ms=fwd[0] * 1e3, backward_ms=bwd[0] * 1e3,
                                 forward_host_ms=fwd[1] * 1e3, backward_host_ms=bwd[1] * 1e3)
    return times


def _floors(name, value_dtype, loc_dtype, result, op_ms):
    """The forward's time floors on this GPU beside the bare op's time: the DRAM floor
    (forward_bytes over the bandwidth), the gather floor (gather_bytes: no corner read
    shared) and the time to read every gathered corner from L2 at the measured L2 copy
    bandwidth (below it, the L1 cache serves part of the corners)."""
    value_size = torch.empty((), dtype=value_dtype).element_size()
    point_size = torch.empty((), dtype=loc_dtype or value_dtype).element_size()
    floor_bytes = forward_bytes(name, value_size, point_size)
    gathered = gather_bytes(name, value_size, point_size)
    bw = result["bandwidth_GBps"]
    best_bw = (bw["theoretical"] or bw["measured_copy"]) * 1e9
    floor_ms = floor_bytes / best_bw * 1e3
    return dict(bytes=floor_bytes, floor_ms=floor_ms, op_forward_ms=op_ms,
                fused_forward_over_floor=op_ms / floor_ms,
                floor_ms_measured_bandwidth=floor_bytes / (bw["measured_copy"] * 1e9) * 1e3,
                gather_bytes=gathered, gather_floor_ms=gathered / best_bw * 1e3,
                l2_gather_ms=gathered / (bw["measured_l2_copy"] * 1e9) * 1e3)


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
             "the C++/CUDA kernel of ddetr/csrc/. float32 (on a GPU also bfloat16); times are "
             "medians; peak memory is the extra "
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
        if r.get("command"):
            lines += [f"Command: `{r['command']}`  ", f"Commit: `{r.get('commit')}`"
                      + (" (with uncommitted changes)" if r.get("uncommitted_changes") else "")
                      + (f"  \n{r['provenance']}" if r.get("provenance") else ""), ""]
        if "load_average_at_start" in r:
            lines += [f"Load average (1, 5, 15 min) at start {r['load_average_at_start']}, at "
                      f"end {r.get('load_average_at_end')}: with other jobs on the machine "
                      f"absolute times vary from run to run (the JSON also holds the fastest "
                      f"run of each case); reference and fused run side by side, so the "
                      f"ratios are the steadier numbers.", ""]
        lines += _cuda_table(r) if device == "cuda" else _cpu_table(r)
        lines.append("")
    path = out / "kernels.md"
    path.write_text("\n".join(lines))
    return path


def _label(name, e):
    sz = e["sizes"]
    return (f"{name} (N={sz['N']}, S={sz['S']}, Lq={sz['Lq']}, M={sz['M']}, "
            f"D={sz['D']}, L={sz['L']}, K={sz['K']})")


def _cpu_table(r):
    """The CPU rows: reference and fused per shape, then their ratios."""
    lines = ["| shape | impl | forward ms | fwd+bwd ms | fwd peak MB | fwd+bwd peak MB |",
             "|---|---|---:|---:|---:|---:|"]
    for name, e in r["shapes"].items():
        for impl, row in e["impls"].items():
            lines.append(f"| {_label(name, e) if impl == 'reference' else ''} | "
                         f"{'fused' if impl == 'kernel' else impl} | "
                         f"{row['forward_ms']:.2f} | {row['forward_backward_ms']:.2f} | "
                         f"{row.get('forward_peak_MB', '-')} | "
                         f"{row.get('forward_backward_peak_MB', '-')} |")
        mem = e.get("memory_ratio") or {}
        lines.append(f"| | **ratio** | **{e['speedup']['forward']:.1f}x** | "
                     f"**{e['speedup']['forward_backward']:.1f}x** | "
                     f"{_fmt(mem.get('forward'))} | {_fmt(mem.get('forward_backward'))} |")
    return lines


def _cuda_table(r):
    """The GPU rows: per shape and dtype, each implementation with its speed-up over the
    reference, then the floors; and the goals of the fused kernel."""
    bw = r.get("bandwidth_GBps", {})
    lines = [f"Bandwidth: {bw.get('theoretical')} GB/s theoretical, "
             f"{bw.get('measured_copy')} GB/s measured (device copy). Floors at the "
             f"theoretical bandwidth: DRAM = read value, locations and weights once and "
             f"write the output; gather = every corner of every point read from memory.", "",
             "| shape | dtype | impl | forward ms | fwd+bwd ms | x reference fwd / fwd+bwd "
             "| fwd+bwd peak MB |", "|---|---|---|---:|---:|---:|---:|"]
    for name, e in r["shapes"].items():
        for dtype in r.get("dtypes", ["float32"]):
            one = e if dtype == "float32" else e[dtype]
            speedups = one.get("speedup_by_impl", {"kernel": one["speedup"]})
            for impl, row in one["impls"].items():
                first = impl == "reference"
                x = speedups.get(impl)
                lines.append(
                    f"| {_label(name, e) if first and dtype == 'float32' else ''} | "
                    f"{dtype if first else ''} | {'CUDA' if impl == 'kernel' else impl} | "
                    f"{row['forward_ms']:.3f} | {row['forward_backward_ms']:.3f} | "
                    + (f"{x['forward']:.1f}x / {x['forward_backward']:.1f}x" if x else "")
                    + f" | {row.get('forward_backward_peak_MB', '-')} |")
            f = one.get("bandwidth_floor")
            if f:
                lines.append(f"| | | floors: DRAM / gather / every corner from L2; bare CUDA "
                             f"op | {f['floor_ms']:.3f} / {f.get('gather_floor_ms', float('nan')):.3f}"
                             f" / {f.get('l2_gather_ms', float('nan')):.3f}; "
                             f"{f['op_forward_ms']:.3f} ({f['fused_forward_over_floor']:.2f}x "
                             f"DRAM) | | | |")
    lines += ["", "Bare ops (torch.ops.ddetr.* and the official module's functions, no "
              "autograd or Python wrapper): GPU time from CUDA events around 20 back-to-back "
              "calls, warm L2; host ms is the time to enqueue one call (GPU-bound where it is "
              "below the GPU time).", "",
              "| shape | dtype | impl | forward ms | backward ms | fwd+bwd ms | host ms fwd / bwd |",
              "|---|---|---|---:|---:|---:|---:|"]
    for name, e in r["shapes"].items():
        for dtype in r.get("dtypes", ["float32"]):
            one = e if dtype == "float32" else e[dtype]
            for impl, b in one.get("bare", {}).items():
                lines.append(f"| {name} | {dtype} | {impl} | {b['forward_ms']:.4f} | "
                             f"{b['backward_ms']:.4f} | {b['forward_ms'] + b['backward_ms']:.4f}"
                             f" | {b['forward_host_ms']:.4f} / {b['backward_host_ms']:.4f} |")
    lines += [""] + [f"- {line}" for line in cuda_goals(r)]
    return lines


def cuda_goals(r):
    """The fused CUDA kernel against its goals (issues 16 and 31), a sentence each, from
    a kernels_cuda.json result: its forward within 3x of the DRAM floor at the encoder
    shape; forward+backward at least 10x faster than the reference (end to end) and at
    least 2x faster than the official op (bare GPU time); bfloat16 at least 1.6x faster
    than float32 (bare GPU time)."""
    said = []
    enc = r["shapes"].get("encoder")
    if enc and enc.get("bandwidth_floor"):
        f = enc["bandwidth_floor"]
        said.append(f"encoder forward at {f['fused_forward_over_floor']:.2f}x its DRAM floor "
                    f"(goal <= 3x): " + ("met" if f["fused_forward_over_floor"] <= 3 else
                                         "not met")
                    + (f"; {f['op_forward_ms'] / f['l2_gather_ms']:.2f}x the time of reading "
                       f"every corner from L2" if f.get("l2_gather_ms") else ""))
    bare_sum = lambda b: b["forward_ms"] + b["backward_ms"]  # noqa: E731
    for name, e in r["shapes"].items():
        x = e["speedup"]["forward_backward"]
        said.append(f"{name}: forward+backward {x:.1f}x faster than the reference "
                    f"(goal >= 10x): " + ("met" if x >= 10 else "not met"))
        bare = e.get("bare", {})
        if "official" in bare:
            o = bare_sum(bare["official"]) / bare_sum(bare["CUDA"])
            said.append(f"{name}: forward+backward {o:.2f}x faster than the official op "
                        f"(bare GPU time; goal >= 2x): " + ("met" if o >= 2 else "not met")
                        + _host_bound(bare.values()))
        if "bfloat16" in e and "bare" in e["bfloat16"] and "CUDA" in bare:
            b = bare_sum(bare["CUDA"]) / bare_sum(e["bfloat16"]["bare"]["CUDA"])
            said.append(f"{name}: bfloat16 forward+backward {b:.2f}x faster than float32 "
                        f"(bare GPU time; goal >= 1.6x): " + ("met" if b >= 1.6 else "not met")
                        + _host_bound([bare["CUDA"], e["bfloat16"]["bare"]["CUDA"]]))
    return said


def _host_bound(rows):
    """A warning where a bare op's host time reached its GPU time: then the GPU waited
    for the host, and the figure is the host's speed, not the kernel's."""
    slow = any(b[f"{d}_host_ms"] >= 0.9 * b[f"{d}_ms"] for b in rows
               for d in ("forward", "backward"))
    return (" (host-bound: enqueueing a call took as long as running it, so this ratio "
            "measures the host)") if slow else ""


def _fmt(x):
    return "-" if x is None else f"{x:.1f}x"
