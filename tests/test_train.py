"""Training end to end on CPU: train, checkpoint, resume, evaluate, kill, torchrun; the
run folder (lock, refusal, a log never truncated), resume overrides, divergence."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import kill_when_flagged
from ddetr.config import get_config
from ddetr.engine import (CheckpointError, RunFolderError, TrainingDiverged,
                          evaluate_checkpoint, load_checkpoint, read_log, train)
from ddetr.engine.evaluate import METRICS
from ddetr.engine.run_folder import lock_run_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {"d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1,
        "dim_feedforward": 64, "num_queries": 10, "num_feature_levels": 1,
        "attention_backend": "reference", "synthetic_train_images": 8,
        "synthetic_val_images": 4, "synthetic_image_size": 128, "train_scales": [96, 128],
        "max_size": 128, "val_scale": 128, "batch_size": 2, "iters_per_epoch": 2,
        "eval_every": 1, "lr_drop": 1, "lr_warmup_iters": 0, "device": "cpu",
        "threads": 1}      # a fixed thread count: runs reproducible to the bit


def tiny_cfg(tmp, **kw):
    return get_config("cpu", {**TINY, "data_path": str(tmp / "data"),
                              "output_dir": str(tmp / "run"), **kw})


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_train_checkpoint_resume_evaluate(tmp_path):
    # two epochs in one go
    straight = train(tiny_cfg(tmp_path, epochs=2, output_dir=str(tmp_path / "straight")),
                     progress=False)
    # one epoch, then resume for the second: the very same weights
    first = train(tiny_cfg(tmp_path, epochs=1), progress=False)
    ckpt = load_checkpoint(first["checkpoint"])
    assert ckpt["epoch"] == 1 and set(ckpt) >= {"optimizer", "rng", "config", "history"}
    resumed = train(tiny_cfg(tmp_path, epochs=2), resume=True, progress=False)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    a, b = _weights(straight["model"]), _weights(resumed["model"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed["history"][1]["lr"] == pytest.approx(straight["history"][1]["lr"])
    assert resumed["history"][1]["lr"] < resumed["history"][0]["lr"]        # step drop
    # the log: one line per epoch with losses, throughput and the six COCO numbers
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert set(log[-1]["coco"]) == set(METRICS)
    assert log[-1]["train_images_per_s"] > 0 and "train_loss" in log[-1]
    # evaluation of the checkpoint, in process and through the CLI
    stats = evaluate_checkpoint(resumed["checkpoint"], progress=False)
    assert {k: v for k, v in stats.items() if k != "summary"} == resumed["stats"]  # the log's
    # None: not measured (COCOeval's -1, e.g. no large objects in the tiny set)
    assert stats["AP"] is not None
    assert all(stats[k] is None or 0.0 <= stats[k] <= 1.0 for k in METRICS)
    r = subprocess.run([sys.executable, "-m", "ddetr", "evaluate", "--checkpoint",
                        str(resumed["checkpoint"]), "--device", "cpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(k in r.stdout for k in METRICS)
    image = tmp_path / "data" / "val2017" / "000000000001.jpg"
    out = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-m", "ddetr", "demo", "--checkpoint",
                        str(resumed["checkpoint"]), "--image", str(image), "--output",
                        str(out), "--threshold", "0", "--device", "cpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 1000
    # the checkpoint resumes only its own model
    with pytest.raises(ValueError, match="d_model: 32 in the checkpoint, 64 now"):
        train(tiny_cfg(tmp_path, epochs=3, d_model=64), resume=True, progress=False)


@pytest.mark.slow
def test_killed_while_saving_keeps_the_last_checkpoint(tmp_path):
    """A run killed in the middle of writing its epoch-2 checkpoint: epoch 1's survives
    and --resume finishes the run."""
    flag = tmp_path / "saving"
    script = textwrap.dedent(f"""
        import importlib, time
        T = importlib.import_module("ddetr.engine.train")   # the module, not the function
        from ddetr.config import get_config

        real_save, calls = T.save_checkpoint, []

        class Slow:
            def __reduce__(self):
                open({str(flag)!r}, "w").close()
                time.sleep(120)
                return (int, (0,))

        def save(state, path):
            calls.append(1)
            if len(calls) == 2:
                state = dict(state, slow=Slow())
            return real_save(state, path)

        T.save_checkpoint = save
        T.train(get_config("cpu", {TINY!r} | {{"data_path": {str(tmp_path / "data")!r},
                "output_dir": {str(tmp_path / "run")!r}, "epochs": 3}}), progress=False)
    """)
    kill_when_flagged(script, flag, "training never reached its second save", timeout_s=180)
    ckpt = tmp_path / "run" / "checkpoint.pth"
    assert load_checkpoint(ckpt)["epoch"] == 1
    assert list((tmp_path / "run").glob(".checkpoint.pth.*.tmp"))   # the interrupted write
    run = train(tiny_cfg(tmp_path, epochs=3), resume=ckpt, progress=False)
    assert [r["epoch"] for r in run["history"]] == [1, 2, 3]
    assert [r["epoch"] for r in read_log(tmp_path / "run" / "log.jsonl")] == [1, 2, 3]
    assert load_checkpoint(ckpt)["epoch"] == 3
    assert not list((tmp_path / "run").glob(".checkpoint.pth.*.tmp"))  # cleaned up


@pytest.mark.slow
def test_torchrun_two_cpu_processes_agree(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(f"""
        import os, torch
        from ddetr.config import get_config
        from ddetr.engine import train
        from ddetr.engine.distributed import cleanup, get_world_size

        cfg = get_config("cpu", {TINY!r} | {{"data_path": {str(tmp_path / "data")!r},
                         "output_dir": {str(tmp_path / "run")!r}, "epochs": 1}})
        run = train(cfg, progress=False)
        assert get_world_size() == 2
        flat = torch.cat([v.double().flatten() for v in run["model"].state_dict().values()])
        torch.save({{"weights": flat, "stats": run["stats"]}},
                   {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
        cleanup()
    """))
    # generate the data once, before two processes would race to do it
    from ddetr.data import build_dataset
    build_dataset("val", tiny_cfg(tmp_path))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", str(worker)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1))
    assert torch.equal(r0["weights"], r1["weights"])
    assert r0["stats"] == r1["stats"] and set(r0["stats"]) == set(METRICS)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert len(ckpt["rng"]) == 2


@pytest.mark.slow
def test_time_limit_stops_evaluates_and_saves(tmp_path):
    run = train(tiny_cfg(tmp_path, epochs=5, iters_per_epoch=0, time_limit_min=1e-4),
                progress=False)
    last = run["history"][-1]
    assert len(run["history"]) == 1 and last["time_limited"]
    assert last["train_iterations"] == 1 and set(last["coco"]) == set(METRICS)
    again = train(tiny_cfg(tmp_path, epochs=5, time_limit_min=1e-4), resume="auto",
                  progress=False)                       # finished: nothing more to do
    assert len(again["history"]) == 1


@pytest.mark.slow
def test_tensorboard_logs_losses_and_coco_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny_cfg(tmp_path, epochs=2, tensorboard=True), progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/images_per_s", "lr"} <= tags
    measured = {k for k, v in run["history"][-1]["coco"].items() if v is not None}
    assert "AP" in measured and {f"val/{k}" for k in measured} <= tags
    assert not {f"val/{k}" for k in set(METRICS) - measured} & tags   # n/a: not logged
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2]
    assert losses[-1].value == pytest.approx(run["history"][-1]["train_loss"], rel=1e-6)


# --- the run folder ------------------------------------------------------------------
def test_a_locked_run_folder_is_refused_until_its_holder_dies(tmp_path):
    """A second run into a folder that a live run holds is refused; when the holder is
    killed (a crash: no clean-up), the operating system releases the lock."""
    out, flag = tmp_path / "run", tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from ddetr.engine.run_folder import lock_run_folder
        with lock_run_folder({str(out)!r}):
            open({str(flag)!r}, "w").close()
            time.sleep(120)
    """)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flag.exists(), "the holder never took the lock"
        with pytest.raises(RunFolderError, match="is in use by another run") as info:
            train(tiny_cfg(tmp_path, epochs=1), progress=False)
        assert str(out) in str(info.value) and f"pid {holder.pid}" in str(info.value)
        assert not (out / "checkpoint.pth").exists()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    with lock_run_folder(out):                     # released by the holder's death
        with pytest.raises(RunFolderError):        # and held by this process now
            train(tiny_cfg(tmp_path, epochs=1), progress=False)


def test_the_lock_file_goes_with_the_run_that_made_it(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(KeyError):
        with lock_run_folder(out):
            assert (out / ".lock").is_file()
            with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):
                with lock_run_folder(out):          # a second open file: refused
                    pass
            assert (out / ".lock").is_file()        # the refused one leaves it alone
            raise KeyError("any error")
    assert list(out.iterdir()) == []


def test_a_new_run_never_overwrites_a_previous_one(tmp_path):
    train(tiny_cfg(tmp_path, epochs=1), progress=False)
    log, ckpt = tmp_path / "run" / "log.jsonl", tmp_path / "run" / "checkpoint.pth"
    before = log.read_bytes(), ckpt.read_bytes()
    with pytest.raises(RunFolderError, match="holds a previous run .*resume") as info:
        train(tiny_cfg(tmp_path, epochs=2), progress=False)
    assert str(tmp_path / "run") in str(info.value)
    assert (log.read_bytes(), ckpt.read_bytes()) == before


@pytest.mark.slow
def test_resume_applies_resumable_overrides_and_refuses_the_others(tmp_path, capsys):
    train(tiny_cfg(tmp_path, epochs=1, lr=1e-4), progress=False)
    run = train(tiny_cfg(tmp_path, epochs=2, lr=3e-4), resume=True, progress=False)
    # TINY drops the rate tenfold after every epoch (lr_drop=1): epoch 2 ran at 3e-5
    assert run["history"][1]["lr"] == pytest.approx(3e-5)
    state = load_checkpoint(run["checkpoint"])
    assert state["config"]["lr"] == 3e-4 and state["config"]["epochs"] == 2
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-5)
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(3e-4)
    before = run["checkpoint"].read_bytes()
    with pytest.raises(CheckpointError, match="batch_size: 2 in the checkpoint, 4 now"):
        train(tiny_cfg(tmp_path, epochs=3, lr=3e-4, batch_size=4), resume=True,
              progress=False)
    assert run["checkpoint"].read_bytes() == before
    # nothing left to train: an honest message and the checkpoint that exists
    again = train(tiny_cfg(tmp_path, epochs=2, lr=3e-4), resume=True, progress=True)
    assert "nothing to train" in capsys.readouterr().out
    assert again["checkpoint"] == run["checkpoint"] and len(again["history"]) == 2


@pytest.mark.slow
def test_the_log_is_only_ever_appended(tmp_path):
    """Resuming from an earlier checkpoint keeps the later epochs' lines in the file;
    read_log sets them aside behind the resume line."""
    run_dir = tmp_path / "run"
    train(tiny_cfg(tmp_path, epochs=1), progress=False)
    (run_dir / "epoch1.pth").write_bytes((run_dir / "checkpoint.pth").read_bytes())
    train(tiny_cfg(tmp_path, epochs=2), resume=True, progress=False)
    before = (run_dir / "log.jsonl").read_bytes()
    train(tiny_cfg(tmp_path, epochs=2), resume=run_dir / "epoch1.pth", progress=False)
    after = (run_dir / "log.jsonl").read_bytes()
    assert after.startswith(before) and len(after) > len(before)
    assert [r["epoch"] for r in read_log(run_dir / "log.jsonl")] == [1, 2]
    assert b'"resumed_at_epoch": 1' in after[len(before):]


def test_eval_every_zero_evaluates_only_at_the_end(tmp_path):
    run = train(tiny_cfg(tmp_path, epochs=2, eval_every=0), progress=False)
    assert ["coco" in r for r in run["history"]] == [False, True]
    assert set(run["stats"]) == set(METRICS)


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The model's outputs turn NaN at the first step of epoch 2 (the matcher's cost is
    then NaN): the run stops saying so, and epoch 1's checkpoint stays as it was."""
    import importlib
    T = importlib.import_module("ddetr.engine.train")
    real_build, steps = T.build_model, []

    def build_model(cfg):
        model, criterion, postprocessor = real_build(cfg)

        def poison(module, inputs, outputs):
            if module.training:
                steps.append(1)
                if len(steps) > 2:          # TINY: two steps per epoch
                    outputs["pred_logits"] = outputs["pred_logits"] * float("nan")
            return outputs

        model.register_forward_hook(poison)
        return model, criterion, postprocessor

    ckpt = tmp_path / "run" / "checkpoint.pth"
    saved, real_save = [], T.save_checkpoint

    def save(state, path):                 # the bytes of every checkpoint written
        real_save(state, path)
        saved.append(path.read_bytes())

    monkeypatch.setattr(T, "save_checkpoint", save)
    monkeypatch.setattr(T, "build_model", build_model)
    with pytest.raises(TrainingDiverged) as info:
        train(tiny_cfg(tmp_path, epochs=2), progress=False)
    text = str(info.value)
    assert "diverged at epoch 2, iteration 1" in text and "pred_logits" in text
    assert f"{ckpt} (epoch 1), is kept" in text and "\n" not in text
    assert len(saved) == 1 and ckpt.read_bytes() == saved[0]      # epoch 1's, untouched
    assert [r["epoch"] for r in read_log(tmp_path / "run" / "log.jsonl")] == [1]


def test_the_backend_check_follows_the_operator(monkeypatch):
    """Triton on a CPU passes under its interpreter and is refused without it."""
    pytest.importorskip("triton")
    from ddetr.engine.train import check_attention_backend
    cfg = get_config("cpu", {"attention_backend": "triton"})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_attention_backend(cfg, torch.device("cpu"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="config key 'attention_backend': 'triton' cannot "
                                         "run on cpu: .*TRITON_INTERPRET=1"):
        check_attention_backend(cfg, torch.device("cpu"))
