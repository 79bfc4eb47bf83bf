"""The torch.compile benchmark (python -m ddetr bench compile): the budget arithmetic,
real eager passes over the preset's loader, the table, and its errors. (The compiled
side takes minutes to compile on two cores: it runs in the benchmark, not here.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ddetr.config import get_config
from ddetr.experiments.compile_cost import (budget_images, compile_table, loader_batches,
                                            timed_passes)

ROOT = Path(__file__).resolve().parents[1]


def test_budget_counts_the_compile_time_against_the_compiled_side():
    result = {"batch_size": 4,
              "eager": {"steady_ms": 400.0, "first_pass_excess_s": 5.0},
              "compiled": {"steady_ms": 250.0, "first_pass_excess_s": 125.0}}
    got = budget_images(result, budget_min=10)
    # 120 s of compiling beyond eager's own first-sight cost; 600 s / 0.4 s = 1500 steps,
    # (600 - 120) s / 0.25 s = 1920 steps, 4 images each
    assert got == {"compile_s": 120.0, "steady_speedup": 1.6,
                   "budget_images_eager": 6000, "budget_images_compiled": 7680}
    result["compiled"]["first_pass_excess_s"] = 900.0      # longer than the budget
    assert budget_images(result, budget_min=10)["budget_images_compiled"] == 0


def test_eager_passes_over_the_loaders_batches(tmp_path):
    cfg = get_config("cpu", {"data_path": str(tmp_path / "data"), "synthetic_train_images": 8,
                             "synthetic_val_images": 2, "d_model": 32, "n_heads": 2,
                             "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 64,
                             "num_queries": 10, "amp": False, "batch_size": 2})
    batches = loader_batches(cfg, 3)
    assert len(batches) == 3 and all(len(b[2]) == 2 for b in batches)
    first, second = timed_passes(cfg, batches, compiled=False)
    assert len(first) == len(second) == 3 and min(first + second) > 0
    result = {"machine": {"cpu": "cpu", "cpu_cores": 2, "native_bf16": False,
                          "torch": "x"}, "threads": 2, "load_average_at_start": 0.1,
              "command": "c", "commit": "abc", "uncommitted_changes": False,
              "config": "cpu", "precision": "float32", "batches": 3, "batch_size": 2,
              "image_sizes": [(224, 224), (256, 256)], "budget_min": 15,
              "eager": {"first_pass_s": first, "steady_ms": 1e3 * sum(second) / 3,
                        "first_pass_excess_s": sum(first) - sum(second)},
              "compiled": {"first_pass_s": first, "steady_ms": 1e3 * sum(second) / 3,
                           "first_pass_excess_s": sum(first) - sum(second)}}
    result.update(budget_images(result, 15))
    table = compile_table(result)
    assert "| eager |" in table and "| compiled |" in table and "224x224, 256x256" in table


@pytest.mark.parametrize("args, message", [
    (["--batches", "0"], "batches expects >= 1 and budget_min > 0, got batches=0"),
    (["--budget-min", "0"], "budget_min > 0, got batches=12, budget_min=0.0"),
    (["lr=0"], "config key 'lr' expects > 0"),
])
def test_bad_arguments_are_one_line(tmp_path, args, message):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "ddetr", "bench", "compile",
                        "--out", str(tmp_path / "out"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()          # refused before anything was written
