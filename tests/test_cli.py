"""The command line, run for real in a subprocess: every mistake is one line on stderr
with exit status 2, --debug shows the traceback, overrides stand anywhere."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddetr import cli as cli_module
from ddetr.cli import build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]
TINY = ["d_model=32", "n_heads=2", "enc_layers=1", "dec_layers=1", "dim_feedforward=64",
        "num_queries=10", "num_feature_levels=1", "two_stage=false", "with_box_refine=false",
        "dn_detr=false",
        "attention_backend=reference", "device=cpu", "train_scales=[64]", "max_size=64",
        "val_scale=64", "batch_size=1", "epochs=1"]


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}          # this worktree's ddetr
    return subprocess.run([sys.executable, "-m", "ddetr", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _bad_coco(root):
    """A COCO folder whose one annotation has a 3-number bbox."""
    from PIL import Image
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(root / f"{split}2017" / "a.jpg")
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps({
            "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 64}],
            "annotations": [{"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}],
            "categories": [{"id": 1, "name": "a"}]}))
    return root


CASES = {
    "bad value": (["train", "lr=-1"], "config key 'lr' expects > 0, got -1.0"),
    "yaml line": (["train", "--config", "{tmp}/bad.yaml"], "bad.yaml, line 3, column 5: "),
    "override after options": (["train", "epochs=2", "--no-progress", "--config", "cpu",
                                "batch_size=0"], "config key 'batch_size' expects >= 1"),
    "override after --resume": (["train", "--resume", "lr=-1"], "config key 'lr' expects > 0"),
    "missing checkpoint": (["evaluate", "--checkpoint", "{tmp}/none.pth", "--device", "cpu"],
                           "none.pth does not exist"),
    "bad annotation": (["train", "dataset=coco", "data_path={tmp}/coco", *TINY,
                        "output_dir={tmp}/run"],
                       "instances_train2017.json: annotation id 3 (image id 1): bbox must be "
                       "[x, y, width, height] (4 numbers), got [1, 2, 3]"),
    "config folder": (["train", "--config", "{tmp}/coco/"], "coco is a directory; expected a "
                      "YAML file"),
    "yaml-named folder": (["train", "--config", "{tmp}/folder.yaml"],
                          "folder.yaml is a directory"),
    "eval every 0": (["experiment", "convergence", "--eval-every", "0", "--out", "{tmp}/o"],
                     "eval_every (--eval-every) expects >= 1, got 0"),
    "jobs 0": (["experiment", "convergence", "--jobs", "0", "--out", "{tmp}/o"],
               "jobs (--jobs) expects >= 1, got 0"),
    "negative lr drop": (["experiment", "convergence", "--lr-drop", "-5", "--out", "{tmp}/o"],
                         "lr_drop (--lr-drop) expects >= 1, got -5"),
    "repeat 0": (["bench", "kernels", "--repeat", "0", "--device", "cpu", "--out", "{tmp}/o"],
                 "--repeat expects >= 1 (timed runs per case), got 0"),
}
if not torch.cuda.is_available():
    CASES["no cuda"] = (["train", "device=cuda"], "CUDA is not available")


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_mistake_is_one_line_with_status_2(tmp_path, case):
    args, message = CASES[case]
    (tmp_path / "bad.yaml").write_text("preset: cpu\nepochs: 3\n  lr: 1e-4\n")
    (tmp_path / "folder.yaml").mkdir()
    _bad_coco(tmp_path / "coco")
    r = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"python -m ddetr {args[0]}: error: ") and message in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, message", [
    (["train", "learning_rate=1"], "unknown config key(s) ['learning_rate'] in overrides"),
    (["train", "--config", "nope"], "unknown preset 'nope'"),
    (["train", "architecture=detr"], "config keys 'architecture', 'num_feature_levels'"),
    (["train", "dropout=1"], "config key 'dropout' expects a value in [0, 1), got 1.0"),
    (["train", "epochs"], "override must look like key=value, got 'epochs'"),
    (["train", "--config", "cpu", "epochs=2", "3"], "override must look like key=value, got '3'"),
])
def test_main_in_process_gives_the_same_line(capsys, args, message):
    from ddetr.cli import main
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    args = ["--debug", "train", "lr=-1"] if where == "before" else ["train", "lr=-1", "--debug"]
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().endswith("ValueError: config key 'lr' expects > 0, got -1.0")


def test_overrides_stand_anywhere_and_resume_does_not_take_one():
    args = parse_args(["train", "epochs=3", "--config", "paper", "lr=1e-4", "--no-progress",
                       "batch_size=1"])
    assert args.config == "paper" and args.no_progress
    assert args.overrides == ["epochs=3", "lr=1e-4", "batch_size=1"]
    args = parse_args(["train", "--resume", "epochs=3"])
    assert args.resume is True and args.overrides == ["epochs=3"]
    args = parse_args(["--debug", "train", "--resume", "runs/a/checkpoint.pth", "epochs=3"])
    assert args.resume == "runs/a/checkpoint.pth" and args.overrides == ["epochs=3"]
    args = parse_args(["evaluate", "data_path=/data/coco", "--checkpoint", "c.pth",
                       "--config", "paper_two_stage", "num_classes=91"])
    assert args.checkpoint == "c.pth" and args.config == "paper_two_stage"
    assert args.overrides == ["data_path=/data/coco", "num_classes=91"]
    args = parse_args(["demo", "--checkpoint", "c.pth", "--image", "x.jpg", "--config",
                       "paper"])
    assert args.config == "paper" and args.overrides == []


def test_one_parser_for_every_verb():
    parser = build_parser()
    assert parser.parse_args(["bench", "build"]).func is cli_module.run_bench_build
    assert parser.parse_args(["bench", "kernels", "--device", "cpu"]).func is cli_module.run_bench_kernels
    assert parser.parse_args(["bench", "cost"]).func is cli_module.run_bench_cost
    args = parser.parse_args(["bench", "train", "--device", "cpu", "amp=true"])
    assert args.func is cli_module.run_bench_train and args.overrides == ["amp=true"]
    args = parser.parse_args(["experiment", "convergence", "--quick", "--seeds", "0", "1"])
    assert args.func is cli_module.run_experiment and args.seeds == [0, 1]
    args = parser.parse_args(["experiment", "record", "runs/x", "--name", "n", "--command", "c"])
    assert args.func is cli_module.run_experiment_record and args.run_command == "c"
    assert not (ROOT / "ddetr" / "engine" / "cli.py").exists()


def test_an_unreadable_checkpoint_is_one_line(tmp_path, capsys):
    from ddetr.cli import main
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "junk.pth"), "--device",
                 "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "junk.pth" in err and "Traceback" not in err


@pytest.mark.parametrize("image, message", [
    ("folder", "image folder is a directory; expected an image file"),
    ("long.png", "image long.png is 20000x8 pixels: resized to the model's scale (shorter side 64, "
                 "longer side at most 64) its shorter side would be 0.03 pixels; expected an "
                 "image whose longer side is at most 64 times its shorter side"),
])
def test_demo_refuses_an_image_it_cannot_take_in_one_line(tmp_path, image, message):
    from PIL import Image

    from ddetr.config import get_config
    from ddetr.engine.checkpoint import config_record
    from ddetr.models import build_model
    cfg = get_config("cpu", TINY)
    torch.save({"model": build_model(cfg)[0].state_dict(), "config": config_record(cfg)},
               tmp_path / "tiny.pth")
    (tmp_path / "folder").mkdir()
    Image.new("RGB", (20000, 8)).save(tmp_path / "long.png")
    r = cli("demo", "--checkpoint", "tiny.pth", "--image", image, "--device", "cpu",
            cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m ddetr demo: error: image ")
    assert message in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "long.png", "tiny.pth"]


def test_a_run_stopped_by_a_corrupt_image_leaves_only_what_it_finished(tmp_path):
    """A COCO image that cannot be decoded is met in the first epoch: one line, exit 2,
    and the run folder holds neither an empty log nor the lock file."""
    from PIL import Image
    coco = tmp_path / "coco"
    for split in ("train", "val"):
        (coco / f"{split}2017").mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(coco / f"{split}2017" / "a.jpg")
        (coco / f"{split}2017" / "b.jpg").write_bytes(b"not a jpeg")
    (coco / "annotations").mkdir()
    for split in ("train", "val"):
        (coco / "annotations" / f"instances_{split}2017.json").write_text(json.dumps({
            "images": [{"id": i, "file_name": name, "width": 64, "height": 64}
                       for i, name in ((1, "a.jpg"), (2, "b.jpg"))],
            "annotations": [{"id": i, "image_id": i, "category_id": 1,
                             "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0}
                            for i in (1, 2)],
            "categories": [{"id": 1, "name": "a"}]}))
    r = cli("train", "dataset=coco", f"data_path={coco}", *TINY, "epochs=2", "--no-progress",
            f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "b.jpg" in lines[0], r.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def test_a_backend_that_cannot_run_here_is_refused_before_any_data(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "ddetr", "train", "attention_backend=triton",
                        "device=cpu", f"data_path={tmp_path / 'data'}",
                        f"output_dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**env, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "python -m ddetr train: error: config key 'attention_backend': 'triton' cannot run "
        "on cpu: "), r.stderr
    assert list(tmp_path.iterdir()) == []                   # no data, no run folder


def test_ctrl_c_during_training_says_where_it_stopped_and_what_is_kept(tmp_path):
    """SIGINT to the process group (as Ctrl-C in a terminal) once epoch 1's checkpoint
    exists: one line naming the place and the kept checkpoint, exit status 130, the
    lock file gone."""
    import re
    import signal
    import time

    from ddetr.engine import load_checkpoint
    run_dir = tmp_path / "run"
    args = [*TINY, "epochs=50", "eval_every=0", "synthetic_train_images=4",
            "synthetic_val_images=2", "synthetic_image_size=64",
            f"data_path={tmp_path / 'data'}", f"output_dir={run_dir}"]
    # A shell ignores SIGINT in the jobs it starts in the background (`make test &`), and
    # Python then installs no Ctrl-C handler in children: give this child the default
    # disposition (a caught signal is reset to it at exec), as a terminal's process has.
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "ddetr", "train", "--no-progress",
                                 *args], cwd=tmp_path,
                                env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        deadline = time.monotonic() + 120
        while (not (run_dir / "checkpoint.pth").exists() and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert (run_dir / "checkpoint.pth").exists(), proc.stderr.read() if proc.poll() else ""
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if not line.startswith("INFO ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    epoch = load_checkpoint(run_dir / "checkpoint.pth")["epoch"]
    assert re.fullmatch(r"python -m ddetr train: training interrupted (in epoch \d+ at "
                        r"iteration \d+ of 4|after training epoch \d+, before its checkpoint "
                        r"was saved|after epoch \d+ was saved); the last checkpoint, "
                        + re.escape(f"{run_dir / 'checkpoint.pth'} (epoch {epoch}), is kept"),
                        lines[0]), lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pth", "log.jsonl"]
