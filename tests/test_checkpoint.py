"""Checkpoint files: atomic and permission-respecting writes, a full disk, one clear error
for each way a file can be wrong, official releases loaded with a preset."""
import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddetr.config import get_config
from ddetr.data.coco_categories import COCO_CATEGORIES
from ddetr.engine import evaluate_checkpoint, load_trained
from ddetr.engine import checkpoint as ckpt
from ddetr.engine.checkpoint import (CheckpointError, CheckpointMismatchError,
                                     config_record, load_checkpoint, save_checkpoint)
from ddetr.models import build_model

ROOT = Path(__file__).resolve().parents[1]

TINY = {"d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1,
        "dim_feedforward": 64, "num_queries": 10, "num_feature_levels": 1,
        "backbone": "resnet18", "two_stage": False, "with_box_refine": False, "dn_detr": False,
        "attention_backend": "reference", "device": "cpu"}


def tiny_checkpoint(path, **kw):
    """A training-style checkpoint of a tiny model; returns (cfg, model)."""
    cfg = get_config("cpu", {**TINY, **kw})
    torch.manual_seed(0)
    model = build_model(cfg)[0]
    save_checkpoint({"model": model.state_dict(), "config": config_record(cfg),
                     "categories": {1: "disc"}}, path)
    return cfg, model


# --- writing ---------------------------------------------------------------------------
FAILING_WRITE = """
import json, resource, signal, sys, torch
from ddetr.engine.checkpoint import save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)         # a write past the limit: EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_checkpoint({"model": {"w": torch.zeros(100_000)}, "epoch": 2}, sys.argv[1])
except OSError as e:
    print(json.dumps([e.errno, str(e)]))
"""


def test_a_failed_write_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    """A real write that fails (a file size limit: EFBIG, as a full disk gives ENOSPC)
    names the file and the reason, not torch's "unexpected pos"; the previous
    checkpoint stays and no temporary file is left."""
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": {"w": torch.arange(5)}, "epoch": 1}, path)
    before = path.read_bytes()
    r = subprocess.run([sys.executable, "-c", FAILING_WRITE, str(path)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout, r.stderr
    number, message = json.loads(r.stdout)
    assert number == errno.EFBIG
    assert message == (f"[Errno {errno.EFBIG}] cannot write checkpoint {path}: "
                       f"{os.strerror(errno.EFBIG)}; the previous checkpoint.pth is kept")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]   # no temporary left


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_permissions_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = save_checkpoint({"model": {}}, tmp_path / "checkpoint.pth")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode


# --- reading: one message for each kind of wrong file -----------------------------------
def test_each_wrong_file_has_its_own_one_line_message(tmp_path):
    def message(path, kind=CheckpointError, match=None):
        with pytest.raises(kind, match=match) as info:
            load_checkpoint(path)
        text = str(info.value)
        assert "\n" not in text and str(path) in text
        return text

    assert "does not exist" in message(tmp_path / "missing.pth", FileNotFoundError)
    assert "is a directory" in message(tmp_path)
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    assert "not a complete file written by torch.save" in message(tmp_path / "notes.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "torch.save" in message(tmp_path / "empty.pth")
    torch.save({"model": {}, "hook": argparse.ArgumentParser}, tmp_path / "code.pth")
    assert "pickles argparse.ArgumentParser" in message(tmp_path / "code.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert "holds a list" in message(tmp_path / "list.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    assert "no 'model' entry" in message(tmp_path / "other.pth")
    assert issubclass(CheckpointError, ValueError)


def test_a_checkpoint_without_config_asks_for_a_preset(tmp_path):
    cfg = get_config("cpu", TINY)
    torch.save({"model": build_model(cfg)[0].state_dict()}, tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match="carries no config.*--config") as info:
        load_trained(tmp_path / "bare.pth")
    assert "\n" not in str(info.value)


def test_a_model_that_does_not_fit_lists_its_keys_in_one_line(tmp_path):
    path = tmp_path / "checkpoint.pth"
    tiny_checkpoint(path)
    state = load_checkpoint(path)
    state["model"]["query_embed.weight"] = torch.zeros(3, 3)
    state["model"]["extra.weight"] = torch.zeros(1)
    save_checkpoint(state, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_trained(path)
    text = str(info.value)
    assert "\n" not in text and str(path) in text
    assert "extra.weight" in text and "query_embed.weight (checkpoint (3, 3)" in text
    assert isinstance(info.value, ValueError)


def test_overrides_cannot_change_the_checkpoints_model(tmp_path):
    path = tmp_path / "checkpoint.pth"
    tiny_checkpoint(path)
    with pytest.raises(CheckpointError, match="d_model=32; overrides cannot change it"):
        load_trained(path, overrides=["d_model=64"])
    assert load_trained(path, overrides=["num_workers=0"])[3] == {1: "disc"}


def test_missing_data_of_a_checkpoint_is_refused_not_regenerated(tmp_path, monkeypatch):
    """A checkpoint whose (relative) data_path does not exist where it is used: evaluation
    names data_path instead of generating a synthetic set in the current directory."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pth"
    cfg, model = tiny_checkpoint(path)
    state = load_checkpoint(path)
    state["config"]["data_path"] = "data/synthetic_elsewhere"    # a relative path
    save_checkpoint(state, path)
    with pytest.raises(CheckpointError, match="data_path .*synthetic_elsewhere, which does "
                                              "not exist here"):
        evaluate_checkpoint(path, progress=False)
    assert not (tmp_path / "data").exists()
    # a new checkpoint records absolute paths
    assert os.path.isabs(config_record(cfg)["data_path"])
    assert os.path.isabs(config_record(cfg)["output_dir"])


# --- official releases --------------------------------------------------------------------
SMALL_PAPER = {"backbone": "resnet18", "enc_layers": 1, "dec_layers": 2}


def official_file(path, **overrides):
    """A file in the official release's layout: model (official names), optimizer,
    lr_scheduler, epoch and the argparse Namespace of the training command."""
    cfg = get_config("paper", {**SMALL_PAPER, **overrides})
    torch.manual_seed(0)
    model = build_model(cfg)[0]
    args = argparse.Namespace(
        lr=2e-4, backbone=cfg.backbone, dilation=False, position_embedding="sine",
        num_feature_levels=cfg.num_feature_levels, enc_layers=cfg.enc_layers,
        dec_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward, hidden_dim=256,
        dropout=0.1, nheads=8, num_queries=300, dec_n_points=4, enc_n_points=4,
        with_box_refine=cfg.with_box_refine, two_stage=cfg.two_stage, masks=False,
        dataset_file="coco", coco_path="./data/coco", output_dir="exps/r50_deformable_detr")
    torch.save({"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "lr_scheduler": {"step_size": 40}, "epoch": 49, "args": args}, path)
    return model


def test_official_release_loads_with_a_preset_and_coco_names(tmp_path):
    path = tmp_path / "r50_deformable_detr-checkpoint.pth"
    model = official_file(path)
    loaded, postprocessor, cfg, categories = load_trained(path, config="paper",
                                                          overrides=SMALL_PAPER)
    assert cfg.num_classes == 91 and cfg.num_queries == 300
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k              # strict, official names
    assert categories == COCO_CATEGORIES and categories[1] == "person"
    with torch.no_grad():
        out = loaded(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    labels = postprocessor(out, torch.tensor([[64, 64]]))[0]["labels"]
    assert all(int(label) in range(91) for label in labels)
    # without a preset, and with a preset of another model: one line each
    with pytest.raises(CheckpointError, match="an official release without one"):
        load_trained(path)
    with pytest.raises(CheckpointError, match="with_box_refine=False; config "
                                              "'paper_box_refine' has with_box_refine=True"):
        load_trained(path, config="paper_box_refine", overrides=SMALL_PAPER)


def test_official_release_loads_from_a_yaml_config(tmp_path):
    path = tmp_path / "r50_deformable_detr_single_scale-checkpoint.pth"
    official_file(path, num_feature_levels=1)
    yaml_file = tmp_path / "single_scale.yaml"
    yaml_file.write_text("preset: paper_single_scale\nbackbone: resnet18\n"
                         "enc_layers: 1\ndec_layers: 2\n")
    model, _, cfg, categories = load_trained(path, config=str(yaml_file))
    assert cfg.num_feature_levels == 1 and len(categories) == 80


def test_an_older_checkpoint_takes_config_defaults_for_keys_it_lacks(tmp_path):
    """A file whose config lacks a key (the compact weights under benchmarks/ lack the
    dn_* keys): the key takes Config's default (here frozen batch norm), not the cpu
    preset's batch norm, and the weights load strictly."""
    cfg = get_config("cpu", {**TINY, "backbone_norm": "frozen_bn"})
    torch.manual_seed(0)
    model = build_model(cfg)[0]
    path = tmp_path / "compact.pth"
    ckpt.save_compact(model, cfg, {1: "disc"}, path)
    blob = torch.load(path, weights_only=True)
    del blob["config"]["backbone_norm"]
    save_checkpoint(blob, path)
    loaded, _, cfg2, _, _ = ckpt.load_compact(path)
    assert cfg2.backbone_norm == "frozen_bn" != get_config("cpu").backbone_norm
    assert not any(k.endswith("num_batches_tracked") for k in loaded.state_dict())
    # the same file with the key spelled out as the cpu preset's: another model, refused
    blob["config"]["backbone_norm"] = "batch_norm"
    save_checkpoint(blob, path)
    with pytest.raises(CheckpointMismatchError):
        ckpt.load_compact(path)


