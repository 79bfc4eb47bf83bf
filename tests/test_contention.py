"""The contention benchmark (ddetr.experiments.contention): one real measurement, the
table, and the CLI's answer to a bad argument."""
import subprocess
import sys

import pytest

from ddetr.experiments.contention import contention_table, measure, settings

from test_train import ROOT


def test_settings_cover_before_after_and_the_usual_suspects():
    names = [s[0] for s in settings(2)]
    assert any("before" in n and "busy" in n for n in names)
    assert any("tuned (after)" in n and "busy" in n for n in names)
    envs = [s[2] for s in settings(2)]
    assert {"OMP_WAIT_POLICY": "PASSIVE"} in envs
    assert any(s[3].get("amp") is False for s in settings(2))


@pytest.mark.slow
def test_one_measurement_next_to_a_busy_process(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    overrides = {"threads": 0, "data_path": str(tmp_path / "data"),
                 "synthetic_train_images": 8, "synthetic_val_images": 4,
                 "synthetic_image_size": 128, "train_scales": [96, 128], "max_size": 128,
                 "val_scale": 128, "d_model": 32, "enc_layers": 1, "dec_layers": 1,
                 "num_queries": 10, "output_dir": str(tmp_path / "run")}
    [result] = measure(1, {}, overrides, 1, iters=2, warmup=1)
    assert result["images_per_s"] > 0 and result["cpu_per_wall"] > 0
    assert sum(result["threads"].values()) == 2          # the tuner ran the two iterations
    row = {"setting": "s", "images_per_s": [result["images_per_s"]],
           "cpu_per_wall": [result["cpu_per_wall"]], "threads_used": [result["threads"]]}
    table = contention_table({"benchmark": "b", "command": "c", "commit": None,
                              "machine": {"cpu": "x", "cpu_cores": 2, "torch": "t"},
                              "load_average_before": [0, 0, 0], "batch_size": 2,
                              "iters": 2, "warmup": 1,
                              "data_loading_images_per_s": 1.0, "results": [row]})
    assert "| s |" in table and "100%" in table and "of batch 2 after" in table


def test_cli_refuses_zero_iterations():
    out = subprocess.run([sys.executable, "-m", "ddetr", "bench", "contention", "--iters", "0"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip().endswith("--iters expects >= 1, got 0")
    assert len(out.stderr.strip().splitlines()) == 1
