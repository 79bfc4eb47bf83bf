"""The learning-rate schedule on progress through the budget (ddetr.engine.schedule)
and the CPU thread tuner (ddetr.engine.threads)."""
import pytest
import torch

from ddetr.config import get_config
from ddetr.engine import schedule as schedule_module
from ddetr.engine.schedule import Schedule, set_base_rates
from ddetr.engine.threads import ThreadTuner


class Clock:
    """A stand-in for time.perf_counter that moves only when told."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _optimizer(lr=1.0):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr},
              {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr / 10}]
    opt = torch.optim.SGD(groups, lr=lr)
    set_base_rates(opt, groups)
    return opt


def _cfg(**kw):
    return get_config("cpu", {"epochs": 11, "lr_drop": 4, "lr_warmup_iters": 0, **kw})


def test_without_a_time_limit_the_rates_follow_torch_step_lr():
    cfg, n = _cfg(), 5
    ours, theirs = _optimizer(), _optimizer()
    step_lr = torch.optim.lr_scheduler.StepLR(theirs, cfg.lr_drop)
    schedule = Schedule(cfg)
    for epoch in range(cfg.epochs):
        schedule.start_epoch(epoch, n)
        for it in range(n):
            assert schedule.step(ours, it)
            assert [g["lr"] for g in ours.param_groups] == pytest.approx(
                [g["lr"] for g in theirs.param_groups]), (epoch, it)
        theirs.step()
        step_lr.step()


def test_the_warm_up_rises_linearly_across_epochs_and_resumes_where_it_was():
    """cfg.lr_warmup_iters = 6 with 4 iterations an epoch: the rates of the first six
    iterations are 1/6 .. 6/6 of the base, then the step drop alone (torch's LinearLR
    times StepLR, stepped per iteration and per epoch, is the independent check)."""
    cfg, n = _cfg(lr_warmup_iters=6, epochs=3, lr_drop=2), 4
    ours, theirs = _optimizer(), _optimizer()
    warm = torch.optim.lr_scheduler.LinearLR(theirs, 1 / 6, 1.0, total_iters=5)
    schedule, expected, got = Schedule(cfg), [], []
    for epoch in range(cfg.epochs):
        if epoch == 1:                               # a resume after epoch 1
            schedule = Schedule(cfg, [{"time_s": 1.0, "train_iterations": n}])
        schedule.start_epoch(epoch, n)
        for it in range(n):
            schedule.step(ours, it)
            got.append(ours.param_groups[1]["lr"])
            expected.append(theirs.param_groups[1]["lr"] * 0.1 ** (epoch // cfg.lr_drop))
            theirs.step()
            warm.step()
        schedule.end_epoch(1.0)
    assert got == pytest.approx(expected)
    assert got[:6] == pytest.approx([0.1 * k / 6 for k in range(1, 7)])


def test_a_slow_machine_drops_at_the_same_fraction_of_its_time_and_stops_at_the_end(
        monkeypatch):
    clock = Clock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    # 11 epochs, a drop every 4: by time, the drops come at 4/11 and 8/11 of the 110 s
    # budget (40 s and 80 s), as StepLR's would after epochs 4 and 8
    cfg, n = _cfg(time_limit_min=110 / 60), 100
    opt, schedule = _optimizer(), Schedule(cfg)
    schedule.start_epoch(0, n)
    rates, it = [], 0
    while schedule.step(opt, it):     # 1 s per iteration: a tenth of an epoch by time
        rates.append(opt.param_groups[0]["lr"])
        clock.now += 1.0
        it += 1
    assert it == 110                  # stopped when the budget was spent, in epoch 1
    assert rates[:40] == [1.0] * 40
    assert rates[40:80] == pytest.approx([0.1] * 40) and rates[80:] == pytest.approx([0.01] * 30)
    assert schedule.time_is_up()


def test_resume_carries_the_time_already_spent(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    cfg = _cfg(time_limit_min=1.0)                   # 60 s; drop at 4/11 of it (21.8 s)
    history = [{"time_s": 20.0}]                     # one epoch logged, 20 s
    opt, schedule = _optimizer(), Schedule(cfg, history)
    schedule.start_epoch(1, 1000)
    assert schedule.step(opt, 0) and opt.param_groups[0]["lr"] == 1.0
    clock.now += 2.0                                 # 22 s in all: past the drop
    assert schedule.step(opt, 1) and opt.param_groups[0]["lr"] == pytest.approx(0.1)
    clock.now += 38.0                                # 60 s: spent
    assert not schedule.step(opt, 2)


def test_the_schedule_records_the_rates_it_set_in_each_epoch(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    cfg = _cfg(time_limit_min=110 / 60)       # by time, the first drop comes at 40 s
    opt, schedule = _optimizer(), Schedule(cfg)
    assert schedule.epoch_rates() == (None, None, None)
    schedule.start_epoch(0, 100)
    for it in range(50):                      # 1 s per iteration
        assert schedule.step(opt, it)
        clock.now += 1.0
    first, last, changed_at = schedule.epoch_rates()
    assert (first, changed_at) == (1.0, 40) and last == pytest.approx(0.1)
    schedule.end_epoch(50.0)
    schedule.start_epoch(1, 100)
    assert schedule.step(opt, 0)
    assert schedule.epoch_rates() == (pytest.approx(0.1), pytest.approx(0.1), None)


class FakeTimes:
    """Iteration times as a function of the thread count (seconds per pixel)."""

    def __init__(self, per_thread):
        self.per_thread = per_thread

    def run(self, tuner, iterations, pixels=100):
        counts = []
        for _ in range(iterations):
            tuner.before()
            counts.append(torch.get_num_threads())
            tuner.after(pixels, seconds=self.per_thread[tuner.current] * pixels)
        return counts


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_tuner_falls_back_to_one_thread_when_that_is_faster(keep_threads):
    tuner = ThreadTuner(4, probe=2, period=5, warmup=0)
    assert tuner.candidates == [4, 2, 1]
    counts = FakeTimes({4: 3.0, 2: 2.0, 1: 1.0}).run(tuner, 6 + 5)
    assert counts == [4, 4, 2, 2, 1, 1] + [1] * 5       # probes, then the fastest
    assert tuner.choice == 1 and tuner.used == {4: 2, 2: 2, 1: 7}
    assert tuner.take_counts() == {"1": 7, "2": 2, "4": 2} and not tuner.used
    # the load goes: the next probe finds all the threads fastest again
    counts = FakeTimes({4: 1.0, 2: 2.0, 1: 3.0}).run(tuner, 6 + 5)
    assert counts[6:] == [4] * 5 and tuner.choice == 4
    tuner.restore()
    assert torch.get_num_threads() == tuner.original


def test_tuner_warms_up_then_probes_less_often_while_the_choice_holds(keep_threads):
    tuner = ThreadTuner(2, probe=1, period=2, warmup=3, max_period=8)
    # the warm-up is untimed: two threads, however slow those iterations are
    counts = FakeTimes({2: 9.0, 1: 9.5}).run(tuner, 3)
    assert counts == [2, 2, 2] and tuner.best_time is None
    # probes (2, 1) then the choice; each probe that keeps it doubles the gap, up to 8
    counts = FakeTimes({2: 1.0, 1: 1.8}).run(tuner, 2 + 4 + 2 + 8 + 2 + 8 + 2 + 4)
    probes = [i for i, c in enumerate(counts) if c == 1]
    assert probes == [1, 7, 17, 27] and tuner.gap == 8 and tuner.choice == 2
    # the load arrives: the slowed choice probes at once, finds one thread and starts
    # again from the shortest gap
    counts = FakeTimes({2: 4.0, 1: 2.0}).run(tuner, 1 + 2 + 2)
    assert counts == [2, 2, 1, 1, 1] and tuner.choice == 1 and tuner.gap == 2


def test_tuner_config(keep_threads):
    cpu = torch.device("cpu")
    assert ThreadTuner.for_config(_cfg(threads=3), cpu).candidates == [3]
    assert ThreadTuner.for_config(_cfg(threads=0), torch.device("cuda")) is None
    tuner = ThreadTuner.for_config(_cfg(threads=1), cpu)
    assert FakeTimes({1: 1.0}).run(tuner, 3) == [1, 1, 1]


def test_tuner_probes_again_as_soon_as_the_chosen_count_slows_down(keep_threads):
    tuner = ThreadTuner(2, probe=2, period=50, warmup=0)
    counts = FakeTimes({2: 1.0, 1: 1.6}).run(tuner, 4 + 5)
    assert counts == [2, 2, 1, 1] + [2] * 5 and tuner.choice == 2
    # another process starts spinning on the cores: two threads become 4x slower
    counts = FakeTimes({2: 4.0, 1: 2.0}).run(tuner, 2 + 4 + 3)
    assert counts == [2, 2] + [2, 2, 1, 1] + [1] * 3      # 2 slow ones, then a probe
    assert tuner.choice == 1
