"""Recorded training runs and the comparison the training chapter prints
(ddetr.experiments.train_record), the training plan line, and the time-budget
schedule in a real run."""
import json
import subprocess
import sys

import pytest

from ddetr.engine import train, training_plan
from ddetr.engine.precision import cpu_has_native_bf16
from ddetr.experiments.train_record import (REFERENCE_FILES, budget_min, compare,
                                            record_run, reference_run, summarise)

from test_train import ROOT, tiny_cfg


def _history():
    # 10 iterations of batch 4 per epoch (40 images); the rate drops in epoch 3, at
    # iteration 5; the third epoch stops at its time limit after 6 iterations
    coco = {"AP": 0.2, "AP50": 0.4, "AP75": 0.1, "APs": 0.1, "APm": 0.2, "APl": 0.3}
    return [
        {"epoch": 1, "lr": 1e-3, "train_iterations": 10, "train_time_s": 20.0, "time_s": 21.0,
         "train_threads": {"2": 10}},
        {"epoch": 2, "lr": 1e-3, "train_iterations": 10, "train_time_s": 40.0, "time_s": 41.0,
         "train_threads": {"1": 7, "2": 3}, "coco": {**coco, "AP": 0.1}},
        {"epoch": 3, "lr": 1e-3, "lr_last": 1e-4, "lr_changed_at": 5, "train_iterations": 6,
         "train_time_s": 30.0, "time_s": 38.0, "train_threads": {"1": 6},
         "time_limited": True, "coco": coco},
    ]


def test_summarise_counts_epochs_images_threads_and_the_drop():
    s = summarise(_history(), batch_size=4, per_epoch=10)
    assert s["iterations"] == 26 and s["images_seen"] == 104 and s["epochs"] == 2.6
    assert s["images_per_s"] == pytest.approx(104 / 90, abs=0.01)
    assert s["train_min"] == pytest.approx(100 / 60, abs=0.05)
    assert s["threads"] == {"2": 13, "1": 13}
    assert s["lr_drop_epoch"] == 2.5 and s["time_limited"]
    assert s["coco"]["AP"] == 0.2 and [e["epoch"] for e in s["evals"]] == [2.0, 2.6]


def test_a_warm_up_is_not_a_drop():
    """The rates rise through a warm-up (epoch 1: the first rate a fraction of the last);
    the drop is where they fall: at the start of epoch 3, or in its middle."""
    history = _history()
    history[0] = {**history[0], "lr": 1e-5, "lr_last": 1e-3, "lr_changed_at": 1}
    assert summarise(history, 4, 10)["lr_drop_epoch"] == 2.5
    history[2] = {**history[2], "lr": 1e-4}
    del history[2]["lr_last"], history[2]["lr_changed_at"]
    assert summarise(history, 4, 10)["lr_drop_epoch"] == 2.0


def test_compare_says_why_a_run_fell_short():
    mine = summarise(_history(), 4, 10)
    reference = {**mine, "epochs": 10.0, "images_per_s": 9.0, "lr_drop_epoch": 8.2,
                 "coco": {"AP": 0.53}}
    table, verdict = compare(mine, reference)
    assert "this run" in table and "reference" in table and "0.530" in table
    assert "AP 0.200" in verdict and "falls short" in verdict
    assert "time limit stopped it" in verdict and "more slowly" in verdict
    _, verdict = compare({**mine, "coco": {"AP": 0.51}}, reference)
    assert "meets the goal" in verdict and "short" not in verdict
    same = {**mine, "epochs": 8.0, "images_per_s": 6.7, "coco": {"AP": 0.45}}
    _, verdict = compare(same, {**same, "coco": {"AP": 0.465}})
    assert "so did the reference run (AP 0.465" in verdict


@pytest.mark.slow
def test_record_a_run_as_the_reference_and_read_it_back(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=2, lr_drop=1)
    run = train(cfg, progress=False)
    out = tmp_path / "benchmarks"
    out.mkdir()
    (out / "train_cpu.json").write_text(json.dumps({"runs": []}))
    record = record_run(tmp_path / "run", "tiny", "python -m ddetr train ...", out_dir=out,
                        reference=True)
    assert record["iterations"] == 4 and record["lr_drop_epoch"] == 1.0
    assert record["threads"] == {"1": 4}             # TINY fixes one thread
    native = cpu_has_native_bf16()
    assert record["native_bf16"] == native and record["machine"]["native_bf16"] == native
    assert record["precision"] == ("bfloat16" if native and cfg.amp else "float32")
    ref, weights = reference_run(out)
    assert ref == json.loads(json.dumps(record)) and weights.is_file()
    assert weights.name == REFERENCE_FILES[native]
    # no reference of the other kind of processor: this one stands in, saying its kind
    assert reference_run(out, native_bf16=not native)[0]["native_bf16"] == native
    assert json.loads((out / "train_cpu.json").read_text())["runs"] == []   # kept
    assert record["coco"]["AP"] == pytest.approx(run["stats"]["AP"])
    recipe = record_run(tmp_path / "run", "tiny recipe", "python -m ddetr train ...",
                        out_dir=out, section="recipe_runs")
    table = (out / "train_cpu.md").read_text()
    assert "tiny recipe" in table and recipe["images_seen"] == 8   # 4 of batch 2
    with pytest.raises(ValueError, match="section must be one of"):
        record_run(tmp_path / "run", "x", "y", out_dir=out, section="other")


def test_the_budget_follows_the_kind_of_processor():
    assert budget_min(native_bf16=True) == 15 and budget_min(native_bf16=False) == 20
    assert budget_min() == budget_min(cpu_has_native_bf16())


@pytest.mark.slow
def test_the_plan_line_and_a_time_budget_that_drops_the_rate_before_it_stops(tmp_path):
    # 50 epochs with a drop every 25 and a 4-second budget: by time, the rate drops
    # halfway through the budget, long before epoch 25, and the run then stops
    cfg = tiny_cfg(tmp_path, epochs=50, lr_drop=25, eval_every=0, iters_per_epoch=0,
                   time_limit_min=4 / 60)
    assert "starts a new run" in training_plan(cfg) and "up to 0.1 more minutes" in \
        training_plan(cfg)
    run = train(cfg, progress=False)
    history = run["history"]
    assert history[-1]["time_limited"] and len(history) < 25
    first, last = history[0]["lr"], history[-1].get("lr_last", history[-1]["lr"])
    assert last == pytest.approx(first / 10)
    assert "has finished" in training_plan(cfg)


def test_record_cli_needs_a_name_and_a_run_folder(tmp_path):
    def record(*args):
        return subprocess.run([sys.executable, "-m", "ddetr", "experiment", "record", *args,
                               "--out", str(tmp_path / "out")], capture_output=True,
                              text=True, cwd=ROOT)
    out = record(str(tmp_path), "--command", "c")
    assert out.returncode == 2 and "the following arguments are required: --name" in out.stderr
    out = record(str(tmp_path), "--name", "n", "--command", "c")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("python -m ddetr experiment: error: checkpoint ")
    assert f"{tmp_path / 'checkpoint.pth'} does not exist" in out.stderr
    assert not (tmp_path / "out").exists()


def test_a_generated_block_replaces_only_itself(tmp_path):
    from ddetr.experiments.markdown_block import markers, write_block

    path = tmp_path / "record.md"
    write_block(path, "t", "| a |", title="Title")
    assert path.read_text().startswith("# Title\n\n" + markers("t")[0])
    path.write_text("prose before\n\n" + path.read_text() + "\nprose after\n")
    write_block(path, "t", "| b |")
    text = path.read_text()
    assert "| b |" in text and "| a |" not in text
    assert text.startswith("prose before") and text.rstrip().endswith("prose after")
    write_block(path, "other", "| c |")                  # no such block: appended
    assert text in path.read_text() and path.read_text().rstrip().endswith(markers("other")[1])
