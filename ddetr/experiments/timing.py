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


def time_side_by_side(fns, inputs, backward, repeat, device):
    """{key: (median, min) seconds} of `repeat` calls of each fn after one warm-up.

    The functions take turns (a, b, a, b, ...) so that both see the same machine: on a
    shared machine other jobs come and go, and timing one after the other would charge
    a busy minute to whichever ran in it. On a CPU the clock is the wall clock around
    each call. On a GPU it is a pair of CUDA events around each call, and before each
    call the L2 cache is flushed (``L2Flush``), so that a small shape does not run from
    the cache that its previous repetition warmed.
    """
    grad_out = None
    if backward:
        with torch.no_grad():
            grad_out = torch.ones_like(next(iter(fns.values()))(*inputs))
    flush = L2Flush() if device == "cuda" else None
    times = {key: [] for key in fns}
    for i in range(repeat + 1):
        for key, fn in fns.items():
            for t in inputs:
                t.grad = None
            if flush is not None:
                flush()
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                call(fn, inputs, backward, grad_out)
                end.record()
                if i > 0:  # the first round is the warm-up
                    times[key].append((start, end))
                continue
            start = time.perf_counter()
            call(fn, inputs, backward, grad_out)
            if i > 0:
                times[key].append(time.perf_counter() - start)
    if flush is not None:
        torch.cuda.synchronize()
        times = {key: [s.elapsed_time(e) / 1e3 for s, e in pairs]
                 for key, pairs in times.items()}
    return {key: (statistics.median(t), min(t)) for key, t in times.items()}


class L2Flush:
    """Calling it evicts the GPU's L2 cache: it writes a buffer of twice the cache's
    size (the device's L2_cache_size; 64 MiB where torch does not report it)."""

    def __init__(self):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        size = getattr(props, "L2_cache_size", 0) or 64 * 2**20
        self.buffer = torch.empty(2 * size, dtype=torch.uint8, device="cuda")

    def __call__(self):
        self.buffer.fill_(1)


def cuda_bare_seconds(fn, runs=20, warmup=3):
    """Seconds per call of fn() from CUDA events around `runs` back-to-back calls: the
    GPU time of a bare op (no autograd, no Python wrapper) when each call's GPU work
    outlasts its launch, which the caller checks against the returned host time.

    Returns:
        (GPU seconds per call, host seconds per call to enqueue it)
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    host = time.perf_counter()
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    host = (time.perf_counter() - host) / runs
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / runs, host


def cuda_bare_ops(inputs, runs=20):
    """{"forward_ms", "backward_ms"} of the bare CUDA ops torch.ops.ddetr.* (GPU time,
    level tables on the host as the wrapper passes them; the backward with a random
    output gradient), plus the host time of each call."""
    value, ss, lsi, loc, w = [t.detach() for t in inputs]
    ss, lsi = ss.cpu(), lsi.cpu()
    N, Lq, M, D = value.shape[0], loc.shape[1], value.shape[2], value.shape[3]
    grad = torch.randn(N, Lq, M * D, device=value.device).to(value.dtype)
    fwd = cuda_bare_seconds(lambda: torch.ops.ddetr.ms_deform_attn(value, ss, lsi, loc, w), runs)
    bwd = cuda_bare_seconds(lambda: torch.ops.ddetr.ms_deform_attn_backward(
        grad, value, ss, lsi, loc, w), runs)
    return dict(forward_ms=fwd[0] * 1e3, backward_ms=bwd[0] * 1e3,
                forward_host_ms=fwd[1] * 1e3, backward_host_ms=bwd[1] * 1e3)


def cuda_bandwidth():
    """(theoretical, measured DRAM, measured L2) bandwidths in bytes/s: the DRAM figure
    from a 256 MiB device copy, the L2 one from a copy of a buffer a quarter of the L2
    size, repeated (it stays in the cache)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    theoretical = None
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        theoretical = 2 * clock_khz * 1e3 * bus_bits / 8  # double data rate
    l2_bytes = getattr(props, "L2_cache_size", 0) or 64 * 2**20
    measured = []
    for nbytes, runs in ((256 * 2**20, 20), (l2_bytes // 4, 200)):
        x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        seconds, _ = cuda_bare_seconds(lambda: y.copy_(x), runs)  # noqa: B023
        measured.append(2 * nbytes / seconds)  # read + write
    return theoretical, measured[0], measured[1]
