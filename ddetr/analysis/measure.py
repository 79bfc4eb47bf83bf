"""Measurements: wall-clock time, peak memory of the tensors an operation allocates,
and the slope of a log-log fit.
"""
import statistics
import time
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def time_fn(fn, *args, repeats=5, warmup=1, **kwargs):
    """Median wall-clock seconds of ``fn(*args, **kwargs)`` over ``repeats`` runs."""
    for _ in range(warmup):
        fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the storages created by operators while it is active, as
    long as some tensor still refers to them, and remembers the peak.

    Every operator output whose storage is new is counted; when the last tensor object
    that holds that storage is garbage collected the bytes are subtracted. Views share
    their base's storage and add nothing. This sees exactly the tensors that PyTorch
    code creates (not the allocator's caching or the operators' internal scratch
    buffers), which is what makes an attention matrix visible.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs = {}  # storage data_ptr -> [number of tensor objects, bytes]

    def _release(self, ptr):
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[ptr]

    def _track(self, t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr == 0:
            return
        entry = self._refs.get(ptr)
        if entry is None:
            entry = self._refs[ptr] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            self._track(t)
        return out


def peak_memory(fn, *args, **kwargs):
    """Peak bytes held by tensors that ``fn(*args, **kwargs)`` creates (inputs excluded).

    Returns (peak_bytes, result). Run it under ``torch.no_grad()`` to measure inference
    (with autograd, the tensors saved for backward stay alive and count too).
    """
    mode = _LiveTensorBytes()
    with mode:
        result = fn(*args, **kwargs)
    return mode.peak, result


def fit_loglog_slope(x, y):
    """Least-squares fit log y = a log x + b; returns (slope a, intercept b).

    A cost that grows like x^p has slope p on a log-log plot.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"need two arrays of the same length >= 2, got {x.shape}, {y.shape}")
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(intercept)
