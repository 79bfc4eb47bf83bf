"""The learning-rate schedule, placed on progress through the run's budget.

A run has two budgets: cfg.epochs, and (when cfg.time_limit_min > 0) a wall-clock
limit. Progress is measured in epochs, as the larger of

    epochs done      = epoch + iteration / iterations per epoch
    time spent       = seconds spent / time budget * cfg.epochs

and the rates are divided by 10 every cfg.lr_drop epochs of progress (the step drop of
the paper, StepLR's rule). With cfg.lr_warmup_iters = W > 0 they also rise linearly over
the run's first W iterations, from 1/W of their value (the gradual warm-up that Goyal et
al. 2017 give rates scaled up with the batch; benchmarks/train_cpu.md records what it
did for the cpu preset: nothing). Without a time limit this is exactly the epoch schedule. With
one, a machine too slow to train cfg.epochs within the limit drops the rate at the same
fraction of its time (lr_drop / epochs of it) and so still anneals before it stops,
instead of stopping before the drop.

    schedule = Schedule(cfg, history)        # history: the log records of earlier epochs
    schedule.start_epoch(epoch, n_iters)
    for it in ...:
        if not schedule.step(optimizer, it):  # sets the rates; False: out of time
            break                             # (the same answer on every process)
    first, last, changed_at = schedule.epoch_rates()   # what it set this epoch

The seconds spent are those of the epochs already logged (their "time_s": training and
evaluation) plus this epoch's so far, averaged over processes so that every process
takes the drop and stops at the same iteration.
"""
import math
import time

from . import distributed as dist


class Schedule:
    """Progress through (cfg.epochs, cfg.time_limit_min) and the rate that goes with it."""

    def __init__(self, cfg, history=()):
        self.epochs, self.lr_drop = cfg.epochs, cfg.lr_drop
        self.warmup = cfg.lr_warmup_iters
        # iterations of the epochs already logged (the warm-up counts every iteration run)
        self.iterations_before = sum(r.get("train_iterations", 0) for r in history)
        self.budget_s = cfg.time_limit_min * 60 if cfg.time_limit_min > 0 else None
        self.spent_s = sum(r["time_s"] for r in history)
        self.epoch, self.n_iters, self.t0 = len(history), 1, time.perf_counter()
        self.iteration = 0                        # the one step() last let run
        self.seconds = self.spent_s
        self.rates = []                   # the first group's rate at each iteration run

    def start_epoch(self, epoch, n_iters):
        """Call at the start of an epoch of n_iters iterations."""
        self.epoch, self.n_iters, self.t0 = epoch, max(n_iters, 1), time.perf_counter()
        self.iteration, self.rates = 0, []

    def end_epoch(self, time_s):
        """Call when an epoch is logged with its "time_s"."""
        self.spent_s += time_s
        self.iterations_before += len(self.rates)

    def _tick(self):
        """Seconds spent in the whole run now, the same number on every process."""
        now = self.spent_s + time.perf_counter() - self.t0
        self.seconds = dist.reduce_mean({"s": now})["s"] if dist.get_world_size() > 1 else now
        return self.seconds

    def progress(self, it):
        """Epochs of progress before iteration it of the current epoch (a float)."""
        by_epochs = self.epoch + it / self.n_iters
        if self.budget_s is None:
            return by_epochs
        return max(by_epochs, self._tick() / self.budget_s * self.epochs)

    def time_is_up(self):
        """Whether the time budget is spent now (False without one)."""
        return self.budget_s is not None and self._tick() >= self.budget_s

    def step(self, optimizer, it):
        """Before iteration it: False when the time budget is spent (stop; never before
        an epoch's first iteration), else set every group's lr to its base rate
        ("initial_lr") times 0.1 ** (drops so far), times the warm-up's share, and
        return True."""
        progress = self.progress(it)
        if self.budget_s is not None and it > 0 and self.seconds >= self.budget_s:
            return False
        factor = 0.1 ** math.floor(progress / self.lr_drop + 1e-9)
        if self.iterations_before + it < self.warmup:
            factor *= (self.iterations_before + it + 1) / self.warmup
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.iteration = it
        self.rates.append(optimizer.param_groups[0]["lr"])
        return True

    def epoch_rates(self):
        """(first, last, changed_at) of the epoch started last: the first group's rate at
        its first and at its last iteration, and the first iteration at another rate
        than the first (None: one rate all epoch); (None, None, None) before any."""
        if not self.rates:
            return None, None, None
        first = self.rates[0]
        changed_at = next((i for i, lr in enumerate(self.rates) if lr != first), None)
        return first, self.rates[-1], changed_at


def set_base_rates(optimizer, groups):
    """Record each group's base rate as "initial_lr" (groups: param_groups(model, cfg),
    the same groups in the same order as optimizer.param_groups)."""
    for group, new in zip(optimizer.param_groups, groups):
        group["initial_lr"] = new["lr"]
