"""Benchmarks: ``python -m ddetr bench build | kernels``.

``bench build`` compiles (or finds cached) the fused operator and says what it built.

``bench kernels`` times multi-scale deformable attention, the grid_sample reference
against the fused kernel, side by side in one run, at three shapes:

    book     the book's CPU model: d_model 128 (M=8, D=16), 4 levels of a 256x256
             image (32x32 .. 4x4, S=1360), encoder queries Lq = S, K=4, N=4
    decoder  the paper's decoder: 4 levels of an 800x1200 image (S=19947),
             Lq=300 object queries, M=8, D=32, K=4, N=2
    encoder  the paper's encoder at the same size: Lq = S = 19947

For each it reports forward time and forward+backward time (median of --repeat runs
after one warm-up, the two implementations taking turns) and peak memory, and the
reference/fused ratios.

Peak memory, measured honestly per device:
  * CPU: PyTorch's CPU allocator is plain malloc, invisible to tracemalloc, so we ask
    the kernel. Each measurement runs in a fresh subprocess: it builds the inputs,
    runs one tiny call so that libraries and thread pools are up, resets the resident
    set high-water mark (``echo 5 > /proc/self/clear_refs``, Linux), runs the call
    once and reads VmHWM. Reported: VmHWM minus the resident size just before the
    call, i.e. the extra memory the call needed (outputs, gradients and temporaries;
    the inputs are excluded). The child runs with a fixed glibc mmap threshold so that
    freed tensors leave the resident set instead of being reused unseen.
  * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    what was allocated before the call (again outputs + gradients + temporaries).

On a GPU the forward time is also compared with its bandwidth floor: the bytes the
forward must move at least (read value, locations and weights once, write the output)
divided by the device's memory bandwidth (theoretical, from the device properties, and
as measured by a large device-to-device copy), against the bare op's time from CUDA
events (no Python wrapper).

Results go to ``<out>/kernels_<device>.json`` and the table ``<out>/kernels.md``.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    # name: (N, [(H, W) per level], M, D, Lq or None for Lq = S, K)
    "book": (4, [(32, 32), (16, 16), (8, 8), (4, 4)], 8, 16, None, 4),
    "decoder": (2, [(100, 150), (50, 75), (25, 38), (13, 19)], 8, 32, 300, 4),
    "encoder": (2, [(100, 150), (50, 75), (25, 38), (13, 19)], 8, 32, None, 4),
}
DESCRIPTIONS = {
    "book": "book CPU model, 256x256 image",
    "decoder": "paper decoder, 800x1200 image, 300 queries",
    "encoder": "paper encoder, 800x1200 image",
}
IMPLS = ("reference", "kernel")


# ---- what the command line runs (ddetr/cli.py builds the parser) --------------------

def run_build(args):
    from .ops import kernel

    status = kernel.load_kernel(with_cuda=True if args.cuda else None, verbose=args.verbose)
    where = kernel.build_directory() or "torch's default extensions folder " \
        "($TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)"
    print(f"build folder: {where}")
    for part in ("cpu", "cuda"):
        state = status[part]
        text = "built and loaded" if state is True else ("not requested" if state is None
                                                         else f"FAILED: {state}")
        seconds = status["seconds"].get(f"ddetr_msda_{part}")
        took = f" ({seconds:.1f} s)" if seconds is not None else ""
        print(f"{part:>4}: {text}{took}")
    failed = any(s not in (True, None) for s in (status["cpu"], status["cuda"]))
    return 1 if failed else 0


def run_kernels(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    result = bench_kernels(device, names, repeat=args.repeat, memory=not args.no_memory)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    table = write_markdown(out)
    print(f"\nwrote {path} and {table}")
    return 0


# ---- inputs ----------------------------------------------------------------------------

def sizes_of(name):
    N, levels, M, D, Lq, K = SHAPES[name]
    S = sum(h * w for h, w in levels)
    return dict(N=N, S=S, M=M, D=D, Lq=S if Lq is None else Lq, L=len(levels), K=K,
                levels=levels)


def make_inputs(name, device, dtype=torch.float32, requires_grad=False, seed=0):
    """Inputs like the model's. `name` is a key of SHAPES or a dict like sizes_of's.

    Sampling locations are a reference point per query plus offsets of a few pixels,
    as in Deformable DETR: an encoder query (Lq = S) is a pixel and its reference point
    is that pixel's centre; a decoder query has a reference point anywhere in the
    image. Offsets are Gaussian with a standard deviation of 2 pixels of the level
    sampled, so some points fall outside near the borders. (Uniformly random points
    would be a worst case for the caches that no trained model produces.) Attention
    weights are softmax-normalised over the L*K points of each head.
    """
    from .ops import level_start_index_of

    s = sizes_of(name) if isinstance(name, str) else name
    N, S, M, D, Lq, L, K = (s[k] for k in ("N", "S", "M", "D", "Lq", "L", "K"))
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(s["levels"], dtype=torch.int64)
    level_start_index = level_start_index_of(spatial_shapes)
    value = torch.randn(N, S, M, D, generator=gen)
    if Lq == S:  # encoder: the centre of every pixel of every level, in S order
        centres = []
        for h, w in s["levels"]:
            y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                                  indexing="ij")
            centres.append(torch.stack((x, y), -1).view(-1, 2))
        reference = torch.cat(centres).expand(N, S, 2)
    else:  # decoder: anywhere
        reference = torch.rand(N, Lq, 2, generator=gen)
    pixel = 1 / spatial_shapes.flip(1).float().view(1, 1, 1, L, 1, 2)  # (1/W, 1/H)
    offsets = torch.randn(N, Lq, M, L, K, 2, generator=gen) * 2 * pixel
    loc = reference.view(N, Lq, 1, 1, 1, 2) + offsets
    w = torch.randn(N, Lq, M, L * K, generator=gen).softmax(-1).view(N, Lq, M, L, K)
    value, loc, w = (t.to(device=device, dtype=dtype).contiguous().requires_grad_(requires_grad)
                     for t in (value, loc, w))
    return [value, spatial_shapes.to(device), level_start_index.to(device), loc, w]


def _function(impl):
    from .ops import ms_deform_attn

    return lambda *args: ms_deform_attn(*args, backend=impl)


def _call(fn, inputs, backward, grad_out=None):
    out = fn(*inputs)
    if backward:
        out.backward(grad_out)
    return out


# ---- time ------------------------------------------------------------------------------

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(fns, inputs, backward, repeat, device):
    """{key: (median, min) seconds} of `repeat` calls of each fn after one warm-up.

    The functions take turns (a, b, a, b, ...) so that both see the same machine: on a
    shared machine other jobs come and go, and timing one after the other would charge
    a busy minute to whichever ran in it.
    """
    grad_out = None
    if backward:
        with torch.no_grad():
            grad_out = torch.ones_like(next(iter(fns.values()))(*inputs))
    times = {key: [] for key in fns}
    for i in range(repeat + 1):
        for key, fn in fns.items():
            for t in inputs:
                t.grad = None
            _sync(device)
            start = time.perf_counter()
            _call(fn, inputs, backward, grad_out)
            _sync(device)
            if i > 0:  # the first round is the warm-up
                times[key].append(time.perf_counter() - start)
    return {key: (statistics.median(t), min(t)) for key, t in times.items()}


# ---- memory ----------------------------------------------------------------------------

MEMORY_CHILD = """
import json, sys
from ddetr.bench import _cpu_memory_child
print("RESULT", json.dumps(_cpu_memory_child(*json.loads(sys.argv[1]))))
"""


def _vm_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes
    raise RuntimeError(f"{key} not in /proc/self/status")


def _cpu_memory_child(name, impl, backward):
    """Runs in a fresh process: extra resident memory of one call, in bytes."""
    fn = _function(impl)
    # one tiny call first: loads the kernel library and starts the thread pool, whose
    # memory is not the call's
    tiny = dict(N=1, S=5, M=2, D=4, Lq=3, L=2, K=2, levels=[(2, 2), (1, 1)])
    _call(fn, make_inputs(tiny, "cpu", requires_grad=backward), backward,
          torch.ones(1, 3, 8) if backward else None)
    inputs = make_inputs(name, "cpu", requires_grad=backward)
    s = sizes_of(name)
    grad_out = torch.ones(s["N"], s["Lq"], s["M"] * s["D"]) if backward else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _vm_status("VmRSS")
    _call(fn, inputs, backward, grad_out)
    return _vm_status("VmHWM") - before


def cpu_peak_memory(name, impl, backward):
    """Extra peak resident memory (bytes) of one call, from a fresh subprocess."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               # glibc: every block of 64 KiB or more is its own mmap, returned to the
               # system when freed, so that the resident size follows the live tensors
               # (by default freed temporaries stay resident and are silently reused)
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    run = subprocess.run([sys.executable, "-c", MEMORY_CHILD, json.dumps([name, impl, backward])],
                         capture_output=True, text=True, env=env, timeout=1800)
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  memory measurement failed: {run.stderr.strip().splitlines()[-1:]}")
    return None


def cuda_peak_memory(fn, inputs, backward):
    """Extra peak allocated CUDA memory (bytes) of one call."""
    grad_out = None
    if backward:
        with torch.no_grad():
            grad_out = torch.ones_like(fn(*inputs))
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = _call(fn, inputs, backward, grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


# ---- bandwidth floor (GPU) -------------------------------------------------------------

def forward_bytes(name, element_size=4):
    """Bytes the forward must move at least: read value, locations, weights once and
    write the output once (spatial shapes and start indices are negligible)."""
    s = sizes_of(name)
    points = s["N"] * s["Lq"] * s["M"] * s["L"] * s["K"]
    value = s["N"] * s["S"] * s["M"] * s["D"]
    output = s["N"] * s["Lq"] * s["M"] * s["D"]
    return (value + 3 * points + output) * element_size


def cuda_op_forward_seconds(inputs, runs=20):
    """Seconds per forward of the bare CUDA op, from CUDA events around `runs`
    back-to-back launches: GPU time without the Python wrapper's overhead, which
    would otherwise dominate the small shapes."""
    op = torch.ops.ddetr.ms_deform_attn
    args = [t.detach() for t in inputs]
    for _ in range(3):
        op(*args)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(runs):
        op(*args)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / runs


def cuda_bandwidth():
    """(theoretical, measured) device memory bandwidth in bytes/s."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    theoretical = None
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        theoretical = 2 * clock_khz * 1e3 * bus_bits / 8  # double data rate
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    runs = 20
    for _ in range(runs):
        y.copy_(x)
    torch.cuda.synchronize()
    measured = 2 * x.numel() * runs / (time.perf_counter() - start)  # read + write
    return theoretical, measured


# ---- the benchmark ------------------------------------------------------------------------

def machine_description(device):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")]
        if models:
            cpu = models[0]
    except OSError:
        pass
    info = dict(cpu=cpu, cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version(),
                platform=platform.platform())
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    return info


def bench_kernels(device, names, repeat=5, memory=True):
    from .ops import kernel

    status = kernel.load_kernel(with_cuda=(device == "cuda"))
    if status[device] is not True:
        raise SystemExit(f"the fused {device} kernel is not available: {status[device]}")
    result = dict(device=device, machine=machine_description(device), repeat=repeat,
                  dtype="float32",
                  timing="median (and min) of repeat runs after one warm-up round; "
                         "reference and fused take turns",
                  memory=("CPU: extra peak RSS of one call (VmHWM after clear_refs, fresh "
                          "subprocess, inputs excluded)" if device == "cpu" else
                          "CUDA: max_memory_allocated during one call minus allocated "
                          "before (inputs excluded)"),
                  shapes={})
    if hasattr(os, "getloadavg"):  # a busy machine slows both sides: say how busy it was
        result["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
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
        fns = {impl: _function(impl) for impl in IMPLS}
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
    if hasattr(os, "getloadavg"):
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def _mb(n):
    return None if n is None else round(n / 2**20, 1)


def _ratio(a, b):
    return None if not a or not b else a / max(b, 0.1)


# ---- the markdown table --------------------------------------------------------------------

def write_markdown(out):
    """benchmarks/kernels.md from every kernels_<device>.json in `out`."""
    out = Path(out)
    lines = ["# Fused multi-scale deformable attention: benchmarks", "",
             "Written by `python -m ddetr bench kernels` (ddetr/bench.py), which explains "
             "the method. Reference = pure PyTorch (grid_sample), fused = the C++/CUDA "
             "kernel of csrc/. float32; times are medians; peak memory is the extra "
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
