"""Engine pieces: atomic checkpoints, parameter groups, COCO evaluation, CLI errors."""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from pycocotools.coco import COCO

from conftest import kill_when_flagged
from ddetr.config import get_config
from ddetr.data import generate_synthetic
from ddetr.engine import coco_eval, load_checkpoint, param_groups, save_checkpoint
from ddetr.engine.evaluate import METRICS, to_coco_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_save_is_atomic_when_killed_mid_write(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.arange(5)}, "epoch": 1}, path)
    flag = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, torch
        from ddetr.engine.checkpoint import save_checkpoint

        class Slow:                      # pickling it signals, then hangs mid-write
            def __reduce__(self):
                open({str(flag)!r}, "w").close()
                time.sleep(60)
                return (int, (0,))

        save_checkpoint({{"model": {{"w": torch.zeros(10**6)}}, "slow": Slow(),
                          "epoch": 2}}, {str(path)!r})
    """)
    kill_when_flagged(script, flag, "the saving process never started writing", timeout_s=60)
    state = load_checkpoint(path)            # the previous checkpoint, intact
    assert state["epoch"] == 1 and state["model"]["w"].tolist() == [0, 1, 2, 3, 4]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".pth"] == ["checkpoint.pth"]


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")


def test_param_groups_follow_the_official_split():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = torch.nn.Sequential(torch.nn.Linear(2, 2))
            self.sampling_offsets = torch.nn.Linear(2, 2)
            self.reference_points = torch.nn.Linear(2, 2)
            self.head = torch.nn.Linear(2, 2)
            self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)

    cfg = get_config("cpu", {"lr": 1e-3, "lr_backbone": 1e-4, "lr_linear_proj_mult": 0.1})
    toy = Toy()
    groups = param_groups(toy, cfg)
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-4, 1e-4])
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in toy.backbone.parameters()}
    assert len(groups[2]["params"]) == 4 and len(groups[0]["params"]) == 2


def test_the_optimizer_is_torchs_adamw_over_the_groups():
    """build_optimizer's (fused) AdamW: three steps agree with the textbook for-loop
    AdamW over the same groups and rates."""
    from ddetr.engine.train import build_optimizer
    torch.manual_seed(0)
    cfg = get_config("cpu", {"lr": 1e-3, "lr_backbone": 1e-4, "weight_decay": 0.05})
    model = torch.nn.ModuleDict({"backbone": torch.nn.Linear(8, 8),
                                 "sampling_offsets": torch.nn.Linear(8, 4),
                                 "head": torch.nn.Linear(8, 3)})
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    ours = build_optimizer(model, cfg)
    theirs = torch.optim.AdamW(param_groups(twin, cfg), weight_decay=0.05, foreach=False)
    for _ in range(3):
        for m in (model, twin):
            m.zero_grad()
            sum(layer(torch.ones(8)).square().sum() for layer in m.values()).backward()
        ours.step()
        theirs.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert not torch.equal(model["head"].weight, start["head"].weight)   # it did move


def test_coco_eval_scores_perfect_detections_one(tmp_path):
    root = generate_synthetic(tmp_path / "s", 1, 4, 128, seed=3, verbose=False)
    gt = COCO(str(root / "annotations" / "instances_val2017.json"))
    detections, ids = [], []
    for image_id in gt.getImgIds():
        anns = gt.imgToAnns[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32)
        boxes[:, 2:] += boxes[:, :2]
        detections.append({"boxes": boxes, "scores": torch.ones(len(anns)),
                           "labels": torch.tensor([a["category_id"] for a in anns])})
        ids.append(image_id)
    stats, summary = coco_eval(gt, to_coco_results(detections, ids), ids)
    assert list(stats) == METRICS
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert "Average Precision" in summary
    # no detections: 0 wherever there is something to measure, None (n/a) elsewhere
    assert coco_eval(gt, [])[0] == {k: None if stats[k] is None else 0.0 for k in METRICS}


def test_cli_rejects_unknown_config_key():
    r = _run(["-m", "ddetr", "train", "--config", "cpu", "no_such_key=1"])
    assert r.returncode != 0
    assert "no_such_key" in r.stderr and "Traceback" not in r.stderr


def test_mixed_precision_uses_bfloat16_on_a_cpu_only_where_it_is_native(monkeypatch):
    from ddetr.engine import precision

    cpu = torch.device("cpu")
    assert not precision.needs_grad_scaler(cpu, True)       # bfloat16 needs no scaling
    with precision.autocast(cpu, False):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.autocast_dtype(cpu) == torch.bfloat16
    with precision.autocast(cpu, True):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.autocast_dtype(cpu) is None            # emulated: slower, so off
    with precision.autocast(cpu, True):
        assert not torch.is_autocast_enabled("cpu")
