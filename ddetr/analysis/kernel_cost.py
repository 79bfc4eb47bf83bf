"""Static cost of the CUDA kernels, read without a GPU.

Two numbers per kernel instantiation, from the compiler alone:

* registers and spills: ``nvcc -cubin -Xptxas -v`` prints, for every kernel, the
  registers per thread, the stack frame and the bytes spilled to local memory;
* SASS instructions per sampling point per channel in the forward's inner loop:
  ``cuobjdump -sass`` disassembles the cubin, and we count.

How the instructions are counted: METHOD below.

``kernel_cost_report(out_dir)`` compiles ddetr/csrc/ms_deform_attn_cuda.cu for sm_90
(and sm_80 for the register figures) and writes ``kernel_cost.json`` and
``kernel_cost.md`` into ``out_dir``. ``python -m ddetr bench cost`` calls it.
"""
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..ops import toolchain

SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "ms_deform_attn_cuda.cu"
METHOD = """\
1. Disassemble one kernel. Every branch to an earlier address closes a loop from the
   target to the branch (a branch to itself, the trap after EXIT, is not a loop).
2. For each loop, take its OWN instructions: those between its first and last address
   that are not inside a loop nested in it. NOPs (alignment padding) are not counted.
3. The hot loop is the loop that reads `value` for the sampling points of one
   iteration: its own global loads (LDG) are exactly those of `points` points, i.e.
   4 corners x the loads of one corner's channels (two 128-bit loads for 8 float32
   channels, one for 8 float16/bfloat16 channels, one scalar load for one channel)
   plus the locations and weights (three 128-bit loads per level when K = 4 is
   compile-time, else three scalar loads per point). Where two loops match (the
   kernels' cold pass over NaN/Inf points loads the same in the generic
   instantiation), the first in program order is taken: the hot loop comes first in
   the source. Loops nested in the hot loop (the cold pass, for compile-time L and K)
   are not part of it: a finite input never enters them.
4. Divide the hot loop's own instructions by the sampling points and the channels one
   iteration of it handles: points = L * K for the instantiations with compile-time L
   and K (the loop body is the whole unrolled point loop), else 1; channels = the
   channels per thread (VEC: 8 in the vectorised instantiations, 1 in the generic one
   and in the first version of the kernel, which ran one thread per channel).

Every instruction of the loop body counts once, whichever branch it is on (corners
outside the map skip their loads at run time), so the figure is the cost of a point
whose four corners are all inside: an upper bound for the common path. The count is
made for the forward kernels (the goal is about the forward); the backward kernels get
registers and spills.
"""
GOAL = 20  # SASS instructions per sampling point per channel, float32 forward at sm_90


# ---- the toolchain ----------------------------------------------------------------------

def nvcc_path():
    """nvcc from the PATH, else from the CUDA_HOME torch found; None if neither."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = toolchain.cpp_extension().CUDA_HOME
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return None


def cuobjdump_path():
    """cuobjdump next to nvcc, on the PATH, or the copy Triton ships; None if none."""
    candidates = []
    nvcc = nvcc_path()
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent / "cuobjdump")
    if shutil.which("cuobjdump"):
        candidates.append(Path(shutil.which("cuobjdump")))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" /
                          "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.exists()), None)


def nvcc_command(source, cubin, arch="sm_90", include_dirs=()):
    """The nvcc command that compiles ``source`` to ``cubin`` as the JIT build does
    (torch's include paths and nvcc flags), with ptxas's report (-Xptxas -v)."""
    cpp_extension = toolchain.cpp_extension()
    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        includes = cpp_extension.include_paths(cuda=True)
    includes = [*includes, *toolchain.cuda_companion_paths()[0], *map(str, include_dirs),
                str(Path(source).parent)]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [nvcc_path(), "-cubin", f"-arch={arch}", "-O3", "-std=c++20", "-Xptxas", "-v",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=kernel_cost",
            *cpp_extension.COMMON_NVCC_FLAGS, *[f"-I{i}" for i in includes],
            str(source), "-o", str(cubin)]


def compile_cubin(source, out_dir, arch="sm_90"):
    """Compile ``source`` for ``arch``; returns (cubin path, ptxas report text)."""
    if nvcc_path() is None:
        raise RuntimeError("kernel cost: nvcc was not found (PATH or CUDA_HOME)")
    cubin = Path(out_dir) / f"{Path(source).stem}_{arch}.cubin"
    run = subprocess.run(nvcc_command(source, cubin, arch), capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"kernel cost: nvcc failed for {source} ({arch}):\n"
                           + run.stderr[-3000:])
    return cubin, run.stdout + run.stderr


def disassemble(cubin):
    """cuobjdump -sass of a cubin, as text."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("kernel cost: cuobjdump was not found (CUDA toolkit or Triton)")
    return subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout


# ---- parsing ----------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas(text):
    """ptxas -v report -> {kernel name: dict(arch, registers, stack_bytes, spill_stores,
    spill_loads)}."""
    kernels, current, props = {}, None, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            kernels[current] = dict(arch=m.group(2), registers=None, stack_bytes=0,
                                    spill_stores=0, spill_loads=0)
        elif m := _PROPS.search(line):
            props = m.group(1)
        elif (m := _FRAME.search(line)) and props in kernels:
            kernels[props].update(stack_bytes=int(m.group(1)), spill_stores=int(m.group(2)),
                                  spill_loads=int(m.group(3)))
        elif (m := _USED.search(line)) and current is not None:
            kernels[current]["registers"] = int(m.group(1))
    return kernels


_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text):
    """cuobjdump -sass text -> {kernel name: [(address, opcode, instruction text)]}.

    The opcode is the instruction's first word after its predicate (``@P0``), with its
    modifiers (``LDG.E.128.CONSTANT``)."""
    functions, current = {}, None
    for line in text.splitlines():
        if m := _FUNCTION.match(line):
            current = functions.setdefault(m.group(1), [])
        elif current is not None and (m := _INSTRUCTION.search(line)):
            words = m.group(2).split()
            if words and words[0].startswith("@"):
                words = words[1:]
            if words:
                current.append((int(m.group(1), 16), words[0], m.group(2)))
    return functions


def loops(instructions):
    """[(first address, last address)] of the loops: a branch back to an earlier
    address; loops sharing a head are merged."""
    by_head = {}
    for address, opcode, text in instructions:
        if not opcode.startswith("BRA"):
            continue
        target = re.search(r"0x([0-9a-f]+)", text.split(opcode, 1)[1])
        if target and int(target.group(1), 16) < address:
            head = int(target.group(1), 16)
            by_head[head] = max(by_head.get(head, address), address)
    return sorted(by_head.items())


def own_instructions(instructions, loop, all_loops):
    """The instructions of ``loop`` outside the loops nested in it, NOPs left out."""
    first, last = loop
    nested = [(a, b) for a, b in all_loops if (a, b) != loop and first <= a and b <= last]
    return [(address, opcode, text) for address, opcode, text in instructions
            if first <= address <= last and opcode != "NOP"
            and not any(a <= address <= b for a, b in nested)]


def hot_loop(instructions, expected_loads=None):
    """The loop that reads value (METHOD, step 3): the first loop in program order whose
    own global loads number ``expected_loads``; without it, the one with the most.

    Returns dict(first, last, instructions, loads) or None if no loop matches.
    """
    found = loops(instructions)
    best = None
    for loop in found:
        own = own_instructions(instructions, loop, found)
        loads = sum(op.startswith("LDG") for _, op, _ in own)
        candidate = dict(first=loop[0], last=loop[1], instructions=len(own), loads=loads)
        if expected_loads is not None:
            if loads == expected_loads:
                return candidate
        elif best is None or loads > best["loads"]:
            best = candidate
    return best


def points_per_iteration(d):
    """Sampling points one iteration of the forward's hot loop reads: all L * K where
    both are compile-time, K of one level where the levels run side by side (split),
    else one."""
    if not (d["L"] and d["K"]):
        return 1
    return d["K"] if d.get("split") else d["L"] * d["K"]


def expected_loads(d):
    """Global loads of one iteration of the forward's hot loop for a kernel described by
    ``describe`` (METHOD, step 3)."""
    points = points_per_iteration(d)
    per_corner = 2 if (d["vec"] == 8 and d["dtype"] == "float32") else 1
    levels = points // d["K"] if d["K"] else 1
    locations_and_weights = 3 * levels if (d["K"] == 4 and d["vec"] == 8) else 3 * points
    return points * 4 * per_corner + locations_and_weights


_TEMPLATE = re.compile(r"(forward|backward)_kernelI(f|d|N3c104HalfE|N3c108BFloat16E)"
                       r"(?:Li(\d+)ELi(\d+)ELi(\d+)E(?:Lb([01])E)?([il]))?")
_DTYPES = {"f": "float32", "d": "float64", "N3c104HalfE": "float16",
           "N3c108BFloat16E": "bfloat16"}


def describe(name):
    """A kernel's mangled name -> dict(kind, dtype, vec, L, K, index) (None if it is not
    one of ours). L, K = 0: given at run time; a name without them is the first version
    of the kernel (one thread per channel, run-time L and K, 64-bit index)."""
    m = _TEMPLATE.search(name)
    if m is None:
        return None
    kind, dtype, vec, L, K, split, index = m.groups()
    return dict(kind=kind, dtype=_DTYPES[dtype], vec=int(vec or 1), L=int(L or 0),
                K=int(K or 0), split=split == "1", index="int32" if index == "i" else "int64")


def label(d):
    lk = f"L={d['L']},K={d['K']}" if d["L"] else "L,K at run time"
    return (f"{d['kind']} {d['dtype']} VEC={d['vec']} {lk}"
            f"{' levels split' if d.get('split') else ''} {d['index']}")


# ---- the measurement ---------------------------------------------------------------------

def kernel_costs(source=SOURCE, archs=("sm_90", "sm_80"), count_arch="sm_90"):
    """Compile ``source`` for each arch; return a list of one dict per kernel
    instantiation: its label, registers/stack/spills per arch, and for ``count_arch``
    the hot loop's own instructions, loads, points and channels per iteration and
    instructions per point per channel."""
    rows = {}  # by label: the mangled names differ between compiles (anonymous namespace)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            cubin, report = compile_cubin(source, tmp, arch)
            names = {}
            for name, info in parse_ptxas(report).items():
                d = describe(name)
                if d is None:
                    continue
                names[name] = label(d)
                row = rows.setdefault(label(d), dict(kernel=label(d), **d, ptxas={}))
                row["ptxas"][arch] = {k: v for k, v in info.items() if k != "arch"}
            if arch == count_arch:
                for name, instructions in parse_sass(disassemble(cubin)).items():
                    if name not in names:
                        continue
                    row = rows[names[name]]
                    row["total_instructions"] = len(instructions)
                    if row["kind"] != "forward":
                        continue
                    loop = hot_loop(instructions, expected_loads(row))
                    if loop is None:
                        raise RuntimeError(f"kernel cost: no loop of {row['kernel']} has the "
                                           f"{expected_loads(row)} loads of its hot loop")
                    points = points_per_iteration(row)
                    row.update(hot_loop_instructions=loop["instructions"],
                               hot_loop_loads=loop["loads"], points_per_iteration=points,
                               channels_per_iteration=row["vec"],
                               per_point_per_channel=round(
                                   loop["instructions"] / (points * row["vec"]), 2))
    order = {"forward": 0, "backward": 1}
    return sorted(rows.values(), key=lambda r: (order[r["kind"]], r["dtype"], -r["vec"],
                                                -r["L"], r["K"], r.get("split", False)))


def _tool_version(tool):
    run = subprocess.run([tool, "--version"], capture_output=True, text=True)
    lines = [line for line in run.stdout.splitlines() if "release" in line]
    return lines[-1].strip() if lines else run.stdout.strip()[-80:]


def _commit():
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def kernel_cost_report(out_dir="benchmarks", baseline_dir=None):
    """Measure the CUDA kernels' static cost and write kernel_cost.json and .md.

    Args:
        out_dir: folder for kernel_cost.json and kernel_cost.md.
        baseline_dir: a folder holding an earlier ms_deform_attn_cuda.cu (and its
            ms_deform_attn.h) to measure the same way, recorded as the baseline. Without
            it, a baseline already recorded in out_dir/kernel_cost.json is kept.

    Returns:
        the dict written to kernel_cost.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "kernel_cost.json"
    baseline = None
    if baseline_dir is not None:
        baseline = dict(source=str(baseline_dir),
                        kernels=kernel_costs(Path(baseline_dir) / SOURCE.name))
    elif previous.exists():
        baseline = json.loads(previous.read_text()).get("baseline")
    command = f"python -m ddetr bench cost --out {out_dir}" + (
        "" if baseline_dir is None else f" --baseline {baseline_dir}")
    result = dict(
        command=command, commit=_commit(), date=time.strftime("%Y-%m-%d"),
        machine=f"{platform.node()} ({platform.machine()}, {platform.processor() or 'cpu'}), "
                f"no GPU needed", python=sys.version.split()[0],
        nvcc=_tool_version(nvcc_path()), cuobjdump=_tool_version(cuobjdump_path()),
        goal_per_point_per_channel=GOAL, kernels=kernel_costs(), baseline=baseline)
    previous.write_text(json.dumps(result, indent=2) + "\n")
    (out / "kernel_cost.md").write_text(_markdown(result))
    return result


def _table(kernels):
    lines = ["| kernel | regs sm_90 | regs sm_80 | stack / spill bytes | hot-loop instr. "
             "| LDG in it | points x channels | instr. / point / channel |",
             "|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        p90, p80 = k["ptxas"].get("sm_90", {}), k["ptxas"].get("sm_80", {})
        spills = "/".join(str(p.get(f, "-")) for p in (p90,)
                          for f in ("stack_bytes", "spill_stores", "spill_loads"))
        lines.append(f"| {k['kernel']} | {p90.get('registers', '-')} | "
                     f"{p80.get('registers', '-')} | {spills} | "
                     f"{k.get('hot_loop_instructions', '-')} | {k.get('hot_loop_loads', '-')} | "
                     f"{k.get('points_per_iteration', '-')} x {k.get('channels_per_iteration', '-')} | "
                     f"{k.get('per_point_per_channel', '-')} |")
    return "\n".join(lines)


def _markdown(r):
    doc = METHOD.strip()
    parts = [
        "# Static cost of the CUDA kernels (no GPU needed)", "",
        f"Made by `{r['command']}` at commit {r['commit']} on {r['date']}, "
        f"machine {r['machine']}; {r['nvcc']} (nvcc), cuobjdump {r['cuobjdump']}.", "",
        f"Goal: at most {r['goal_per_point_per_channel']} SASS instructions per sampling "
        "point per channel in the float32 forward's inner loop at sm_90, no spills.", "",
        "## How the instructions are counted", "", doc, "",
        "## This kernel (ddetr/csrc/ms_deform_attn_cuda.cu)", "",
        "Registers per thread from `ptxas -v` for sm_90 and sm_80; stack / spill bytes "
        "(stack frame / spill stores / spill loads) at sm_90.", "", _table(r["kernels"]), ""]
    if r.get("baseline"):
        parts += ["## Baseline: the first version (one thread per channel)", "",
                  f"Measured the same way from `{r['baseline']['source']}`.", "",
                  _table(r["baseline"]["kernels"]), ""]
    return "\n".join(parts)


# --- the launch plan and the record, as chapter 5 shows them ----------------------------
def lanes_for(D, vec=8):
    """Threads per (n, q, m) in the CUDA kernels' launch plan (plan_for in
    ms_deform_attn_cuda.cu): the largest power of two <= min(D / vec, 32), where a
    thread handles vec neighbouring channels (8 on the float32 fast path, else 1)."""
    lanes = 1
    while lanes < 32 and 2 * lanes <= D // vec:
        lanes *= 2
    return lanes


def launch_plan(D, float32=True):
    """The CUDA kernels' plan for D channels per head: a dict of "fast" (the 8-channel
    path: float32 and D % 8 == 0), "vec", "lanes" (threads per (query, head)), "rounds"
    of the channel loop and "idle" threads in its last round."""
    if D < 1:
        raise ValueError(f"D (channels per head) must be at least 1, got {D}")
    fast = float32 and D % 8 == 0
    vec = 8 if fast else 1
    lanes = lanes_for(D, vec)
    starts = range(0, D, vec * lanes)         # a thread's first channel in each round
    idle = lanes - (D - starts[-1] + vec - 1) // vec
    return dict(fast=fast, vec=vec, lanes=lanes, rounds=len(starts), idle=idle)


def read_kernel_cost(path="benchmarks/kernel_cost.json"):
    """The dict that kernel_cost_report wrote to path."""
    return json.loads(Path(path).read_text())


def spill_bytes(kernel, arch="sm_90"):
    """Bytes a kernel of the record spills to local memory (stores + loads) at arch."""
    p = kernel["ptxas"][arch]
    return p["spill_stores"] + p["spill_loads"]


def register_summary(cost, arch="sm_90"):
    """The record's registers, spills and instructions per point per channel, as text:
    the forward kernels of the baseline ("first version") and of now, then the range
    over the backward kernels of now."""
    lines = [f"read from benchmarks/kernel_cost.json, made by\n  {cost['command']}\n"
             f"at commit {cost['commit']} on {cost['date']} ({cost['nvcc']})\n",
             f"{'forward kernel':50s} {'regs ' + arch:>10s} {'spill bytes':>11s} "
             f"{'instr./point/channel':>21s}"]
    for version, kernels in (("first version", cost["baseline"]["kernels"]),
                             ("now", cost["kernels"])):
        lines.append(f"-- {version}")
        lines += [f"{k['kernel']:50s} {k['ptxas'][arch]['registers']:10d} "
                  f"{spill_bytes(k, arch):11d} {k['per_point_per_channel']:21.1f}"
                  for k in kernels if k["kind"] == "forward"]
    backward = [k for k in cost["kernels"] if k["kind"] == "backward"]
    regs = [k["ptxas"][arch]["registers"] for k in backward]
    lines.append(f"-- now, {len(backward)} backward kernels: {min(regs)}-{max(regs)} "
                 f"registers at {arch}, {sum(spill_bytes(k, arch) for k in backward)} "
                 f"spill bytes in all")
    return "\n".join(lines)
