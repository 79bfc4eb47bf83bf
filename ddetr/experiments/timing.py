"""Timing the implementations of ms_deform_attn side by side, and on a GPU the two
numbers its forward time is compared with: the bare op's time from CUDA events and the
device's memory bandwidth."""
import statistics
import time

import torch

from ..ops import ms_deform_attn


def implementation(impl):
    """ms_deform_attn with backend=impl, as a function of the five inputs."""
    return lambda *args: ms_deform_attn(*args, backend=impl)


def call(fn, inputs, backward, grad_out=None):
    """fn(*inputs), then its backward with grad_out when backward; returns the output."""
    out = fn(*inputs)
    if backward:
        out.backward(grad_out)
    return out


def synchronize(device):
    """Wait for the device's queued work (a no-op on the CPU)."""
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
            synchronize(device)
            start = time.perf_counter()
            call(fn, inputs, backward, grad_out)
            synchronize(device)
            if i > 0:  # the first round is the warm-up
                times[key].append(time.perf_counter() - start)
    return {key: (statistics.median(t), min(t)) for key, t in times.items()}


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
