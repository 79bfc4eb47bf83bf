"""How many threads a CPU run computes with, chosen while it trains.

PyTorch's CPU operators run on an OpenMP thread pool of one thread per core, and
OpenMP threads spin (busy-wait) at the end of every parallel region for the others.
On a machine that other processes share, one of the run's threads is often off its
core: the others spin for it and every operator waits a scheduler time slice. On the
2-core CI machine (benchmarks/contention.md) training under two busy processes ran at
a quarter of its idle speed on both threads, and at about half (its fair share) on one.

ThreadTuner measures instead of guessing: after `warmup` untimed iterations on all
cores (a run's first iterations build kernels and allocate memory, so their times say
nothing about thread counts), it runs `probe` iterations at each candidate count (all
cores, half of them, one), keeps the fastest (seconds per image pixel, so that
multi-scale batches compare), and trains with it until the next probe -- or sooner,
when `probe` iterations in a row take more than `slower` times the chosen count's probe
time (the load changed). On an idle machine it keeps every core; under load it falls
back to fewer threads and comes back when the load goes.

Probing costs time: a probe at one thread of two is an iteration at about half speed.
So the gap between probes starts at `period` iterations and doubles each time a probe
keeps the count it had, up to `max_period`; a probe that changes the count, or a slowed
count, brings it back to `period`.

Different thread counts add floating-point numbers in different orders, so a run
whose count changes is not reproducible to the bit; cfg.threads = N fixes the count
(no tuning) where that matters.

    tuner = ThreadTuner.for_config(cfg, device)     # None: nothing to tune
    for batch in loader:
        tuner.before()
        ... one iteration on images of shape (N, 3, H, W) ...
        tuner.after(N * H * W)
    tuner.take_counts()                             # {"count": iterations} so far
    tuner.restore()

ddetr.engine.train runs it as one of train_one_epoch's hooks (before and after every
iteration) and logs take_counts() as the epoch's "train_threads".
"""
import statistics
import time
from collections import Counter

import torch


class ThreadTuner:
    """Pick torch's intra-op thread count by timing training iterations."""

    def __init__(self, max_threads, probe=3, period=60, fixed=False, slower=1.5,
                 warmup=5, max_period=480):
        self.candidates = ([max_threads] if fixed else
                           sorted({max_threads, max(1, max_threads // 2), 1}, reverse=True))
        self.probe, self.period, self.slower = probe, period, slower
        self.gap, self.max_period = period, max(max_period, period)   # iterations between probes
        self.best_time, self.slow = None, 0     # the choice's probe time; slow in a row
        self.original = torch.get_num_threads()
        self.choice = max_threads
        self.times = {}                 # candidate -> seconds per pixel of its probes
        self.plan = [max_threads] * warmup   # the counts of the coming iterations
        # iterations before the first choice is made: the warm-up and the first probes
        self.settle_iterations = warmup + (probe * len(self.candidates)
                                           if len(self.candidates) > 1 else 0)
        self.used = Counter()          # count -> iterations trained with it

    @classmethod
    def for_config(cls, cfg, device):
        """The tuner of a CPU run: tuning for cfg.threads == 0, exactly cfg.threads
        threads otherwise; None on a GPU, where there is nothing to tune."""
        if device.type != "cpu":
            return None
        if cfg.threads > 0:
            return cls(cfg.threads, fixed=True)
        return cls(torch.get_num_threads())

    def before(self):
        """Set the thread count of the next iteration."""
        if not self.plan and len(self.candidates) == 1:
            self.plan = self.candidates * self.period
        elif not self.plan:             # probe every candidate, then run the best
            self.times = {c: [] for c in self.candidates}
            self.plan = [c for c in self.candidates for _ in range(self.probe)]
        self.current = self.plan.pop(0)
        self.used[self.current] += 1
        torch.set_num_threads(self.current)
        self._t0 = time.perf_counter()

    def after(self, pixels, seconds=None):
        """Record the iteration just run (pixels: N * H * W of its batch)."""
        seconds = time.perf_counter() - self._t0 if seconds is None else seconds
        if self.current in self.times and len(self.times[self.current]) < self.probe:
            self.times[self.current].append(seconds / max(pixels, 1))
            if all(len(v) == self.probe for v in self.times.values()):
                best = min(self.times, key=lambda c: statistics.median(self.times[c]))
                self.gap = min(2 * self.gap, self.max_period) if best == self.choice \
                    else self.period
                self.choice, self.best_time = best, statistics.median(self.times[best])
                self.times, self.slow = {}, 0
                self.plan = [best] * self.gap
        elif self.best_time is not None and len(self.candidates) > 1:
            late = seconds / max(pixels, 1) > self.slower * self.best_time
            self.slow = self.slow + 1 if late else 0
            if self.slow >= self.probe:          # the load changed: probe again now
                self.plan, self.slow, self.gap = [], 0, self.period

    def take_counts(self):
        """{count (a str, as log.jsonl keeps it): iterations trained with it} since the
        last call, which starts counting afresh."""
        counts = {str(k): v for k, v in sorted(self.used.items())}
        self.used.clear()
        return counts

    def restore(self):
        """Give torch back the thread count it had before."""
        torch.set_num_threads(self.original)
