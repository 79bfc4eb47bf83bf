"""Peak memory of one ms_deform_attn call, measured honestly per device.

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
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .kernel_inputs import make_inputs, sizes_of
from .timing import call, implementation

# the child process: prints "RESULT <bytes>"
CHILD = """
import json, sys
from ddetr.experiments.memory import cpu_peak_memory_here
print("RESULT", json.dumps(cpu_peak_memory_here(*json.loads(sys.argv[1]))))
"""
# where this ddetr was imported from, so that the child imports the same copy
IMPORT_ROOT = Path(__file__).resolve().parents[2]


def cpu_peak_memory(name, impl, backward):
    """Extra peak resident memory (bytes) of one call of ms_deform_attn(backend=impl)
    on the inputs of shape `name` (see kernel_inputs), from a fresh subprocess; None
    where Linux's /proc/self/clear_refs is missing or the subprocess failed."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ,
               PYTHONPATH=str(IMPORT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               # glibc: every block of 64 KiB or more is its own mmap, returned to the
               # system when freed, so that the resident size follows the live tensors
               # (by default freed temporaries stay resident and are silently reused)
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    run = subprocess.run([sys.executable, "-c", CHILD, json.dumps([name, impl, backward])],
                         capture_output=True, text=True, env=env, timeout=1800)
    for line in run.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    print(f"  memory measurement failed: {run.stderr.strip().splitlines()[-1:]}")
    return None


def cpu_peak_memory_here(name, impl, backward):
    """In this process (the subprocess of cpu_peak_memory): extra resident bytes of
    one call."""
    fn = implementation(impl)
    # one tiny call first: loads the kernel library and starts the thread pool, whose
    # memory is not the call's
    tiny = dict(N=1, S=5, M=2, D=4, Lq=3, L=2, K=2, levels=[(2, 2), (1, 1)])
    call(fn, make_inputs(tiny, "cpu", requires_grad=backward), backward,
         torch.ones(1, 3, 8) if backward else None)
    inputs = make_inputs(name, "cpu", requires_grad=backward)
    s = sizes_of(name)
    grad_out = torch.ones(s["N"], s["Lq"], s["M"] * s["D"]) if backward else None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _vm_status("VmRSS")
    call(fn, inputs, backward, grad_out)
    return _vm_status("VmHWM") - before


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
    out = call(fn, inputs, backward, grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak


def _vm_status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB -> bytes
    raise RuntimeError(f"{key} not in /proc/self/status")
