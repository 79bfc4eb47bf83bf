"""The training-step benchmark (python -m ddetr bench train): a real step per setting,
the same losses from the reference and the fused attention, its records, its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddetr.experiments.markdown_block import write_block
from ddetr.experiments.train_step import bench_train_step, random_batch

ROOT = Path(__file__).resolve().parents[1]
TINY = {"d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 2,
        "dim_feedforward": 64, "num_queries": 10, "threads": 1}


def test_random_batch_looks_like_collate_output():
    images, masks, targets = random_batch(3, 40, 56, num_classes=7)
    assert images.shape == (3, 3, 40, 56) and masks.shape == (3, 40, 56) and not masks.any()
    for t in targets:
        assert t["boxes"].shape == (6, 4) and ((t["boxes"] > 0) & (t["boxes"] < 1)).all()
        assert ((t["labels"] >= 1) & (t["labels"] < 7)).all()
        assert t["size"].tolist() == [40, 56]


def test_every_setting_trains_and_the_backends_agree(tmp_path):
    # one step, no warm-up: the loss is that of the same initial model on the same batch,
    # so the two attention implementations must agree (after AdamW's first updates,
    # rounding differences grow: its first steps move every weight by about lr)
    write_block(tmp_path / "train_step.md", "step_speedup", "the speed-up's own block")
    result = bench_train_step(tmp_path, "cpu", "cpu", batch_size=2, size=(64, 64),
                              backends=("reference", "kernel"), amp=(False,), iters=1,
                              warmup=0, overrides=TINY, command="test")
    runs = {r["backend"]: r for r in result["runs"]}
    assert set(runs) == {"reference", "kernel"}
    assert runs["kernel"]["loss"] == pytest.approx(runs["reference"]["loss"], rel=1e-4)
    result = bench_train_step(tmp_path, "cpu", "cpu", batch_size=2, size=(64, 64),
                              backends=("kernel",), amp=(False, True), iters=2, warmup=1,
                              overrides=TINY, command="test")
    for r in result["runs"]:
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["peak_MB"] is None
    saved = json.loads((tmp_path / "train_step_cpu.json").read_text())
    assert saved["runs"] == result["runs"] and saved["command"] == "test"
    assert saved["machine"]["cpu_cores"] and saved["size"] == [64, 64]
    table = (tmp_path / "train_step.md").read_text()
    assert "| kernel | off |" in table and len(result["runs"]) == 2
    assert "the speed-up's own block" in table              # another block stays


@pytest.mark.parametrize("args, message", [
    (["--size", "800"], "--size expects HEIGHTxWIDTH, e.g. 800x1066, got '800'"),
    (["--amp", "maybe"], "--amp expects off and/or on"),
    (["--backends", "triton"], "backend 'triton' runs on a GPU only"),
    (["--backends", "fast"], "backends must be some of ['reference', 'kernel', 'triton']"),
    (["--iters", "0"], "iters expect >= 1"),
    (["lr=0"], "config key 'lr' expects > 0"),
])
def test_bad_arguments_are_one_line(tmp_path, args, message):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "ddetr", "bench", "train", "--device", "cpu",
                        "--out", str(tmp_path / "out"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()          # refused before anything was written


def test_profile_sorts_operators_into_kinds():
    """The fused op's forward kernel runs inside torch.library's autograd wrapper (named
    "GeneratedBackwardFor_..."): a forward alone, profiled for real, is a forward."""
    from types import SimpleNamespace as E

    from ddetr.experiments.train_profile_cpu import operator_kinds
    from ddetr.ops import ms_deform_attn
    shapes = torch.tensor([[16, 16], [8, 8]])
    starts = torch.tensor([0, 256])
    value = torch.randn(1, 320, 4, 8, requires_grad=True)
    locations = torch.rand(1, 320, 4, 2, 4, 2, requires_grad=True)
    weights = torch.rand(1, 320, 4, 2, 4, requires_grad=True)
    ms_deform_attn(value, shapes, starts, locations, weights)      # builds the kernel
    with torch.profiler.profile() as prof:
        for _ in range(20):
            out = ms_deform_attn(value, shapes, starts, locations, weights)
    forward = operator_kinds(prof.key_averages())
    assert forward.get("fused op forward", 0) > 0 and "fused op backward" not in forward
    with torch.profiler.profile() as prof:
        out.sum().backward()
    backward = operator_kinds(prof.key_averages())
    assert backward["fused op backward"] > 0 and "fused op forward" not in backward
    events = [E(key="ddetr::ms_deform_attn_backward", self_cpu_time_total=1e6),
              E(key="aten::convolution_backward", self_cpu_time_total=4e6),
              E(key="aten::sin", self_cpu_time_total=5e6)]
    assert operator_kinds(events) == {"fused op backward": 1.0,
                                      "convolution backward": 4.0, "other": 5.0}
