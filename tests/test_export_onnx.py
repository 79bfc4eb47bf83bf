"""ONNX export, checked against ONNX Runtime itself: the graph is standard operators
(GridSample for the deformable attention), it takes other batch and image sizes than
it was traced at, it agrees with PyTorch, a graph that disagrees is never written, and
the command line does it end to end."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from ddetr.config import get_config
from ddetr.engine import export_onnx as export_module
from ddetr.engine import load_trained
from ddetr.engine.checkpoint import config_record, save_checkpoint
from ddetr.engine.export_onnx import (TOLERANCE, Detector, ExportMismatchError, agrees,
                                      check_images, compare, export_onnx, image_batch,
                                      min_side, onnx_session, run_onnx, run_torch)
from ddetr.models import build_model

ROOT = Path(__file__).resolve().parents[1]
# the cpu preset's model (RegNet, 4 levels, refinement, two-stage), made small
TINY = {"d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 2, "dim_feedforward": 64,
        "num_queries": 10, "val_scale": 96, "max_size": 128, "train_scales": [96]}


def tiny_model(**changes):
    torch.manual_seed(0)
    cfg = get_config("cpu", {**TINY, **changes})
    model, _, post = build_model(cfg)
    return model.eval(), post, cfg


def save_tiny(folder, **changes):
    """A ddetr checkpoint of tiny_model() in folder; returns its path."""
    model, _, cfg = tiny_model(**changes)
    path = folder / "tiny.pth"
    save_checkpoint({"model": model.state_dict(), "config": config_record(cfg),
                     "categories": {1: "circle"}}, path)
    return path


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ddetr", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The export command, run once for real: (model, postprocessor, cfg, the .onnx
    path, the command's result)."""
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint = save_tiny(folder)
    Image.new("RGB", (120, 90), (200, 30, 30)).save(folder / "red.png")
    run = cli("export", "--checkpoint", checkpoint, "--format", "onnx", "--out", "tiny.onnx",
              "--size", "96x128", "--image", "red.png", "--threads", "1", cwd=folder)
    assert run.returncode == 0, run.stderr
    model, post, cfg, _ = load_trained(checkpoint)
    return model, post, cfg, folder / "tiny.onnx", run


def test_the_graph_is_standard_onnx_with_gridsample_attention(exported):
    *_, path, _ = exported
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    ops = {(n.domain or "ai.onnx", n.op_type) for n in graph.graph.node}
    assert all(domain == "ai.onnx" for domain, _ in ops), ops        # no custom operator
    samplers = [n for n in graph.graph.node if n.op_type == "GridSample"]
    assert len(samplers) == 3 * 4       # 3 attention layers (1 encoder, 2 decoder) x 4 levels
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in samplers[0].attribute}
    assert attrs == {"align_corners": 0, "mode": b"linear", "padding_mode": b"zeros"}
    meta = {p.key: p.value for p in graph.metadata_props}
    assert graph.producer_name == "ddetr" and meta["min_side"] == "65"
    assert json.loads(meta["categories"]) == {"1": "circle"}
    assert [i.name for i in graph.graph.input] == ["images", "sizes"]


def test_the_command_checked_two_sizes_and_said_so(exported):
    *_, run = exported
    lines = run.stdout.splitlines()
    pattern = (r"ONNX Runtime vs PyTorch, {} image\(s\) at {}: scores within (\S+), boxes "
               r"within (\S+) of the image side, labels equal")
    for line, (n, size) in zip(lines, [(1, "96x128"), (2, "72x96")]):  # two batches, sizes
        m = re.fullmatch(pattern.format(n, size), line)
        assert m, line
        assert float(m[1]) <= TOLERANCE["score"] and float(m[2]) <= TOLERANCE["box"]
    assert lines[2] == ("wrote tiny.onnx (opset 20; any batch size, images of at least 65 "
                        "pixels a side)")
    assert run.stderr == "", run.stderr                   # the exporter's chatter is quiet


def test_onnx_runtime_matches_pytorch_at_a_size_and_batch_never_traced(exported):
    model, post, _, path, _ = exported
    size = (81, 150)
    images, sizes = image_batch(check_images(None, size, count=3, seed=7), size)
    got = run_onnx(onnx_session(path), images, sizes)
    reference = run_torch(Detector(model, post).eval(), images, sizes)
    assert got[0].shape == (3, 70) and got[2].shape == (3, 70, 4)   # k = Lq x classes
    diff = compare(reference, got, float(sizes.max()))
    assert agrees(diff), diff
    np.testing.assert_array_equal(got[1], reference[1])   # labels, rank by rank
    # the boxes are in pixels of the original images: twice the size, twice the boxes
    doubled = run_onnx(onnx_session(path), images, sizes * 2)
    np.testing.assert_allclose(doubled[2], got[2] * 2, rtol=1e-6, atol=1e-4)


def test_an_image_below_the_smallest_side_is_one_clear_error(exported):
    model, *_, path, _ = exported
    assert min_side(model) == 65                # 4 levels: the coarsest has stride 64
    with pytest.raises(ValueError, match=r"at least 65 pixels on each side.*got 64x100"):
        run_onnx(onnx_session(path), np.zeros((1, 3, 64, 100), np.float32),
                 np.array([[64, 100]]))


def test_a_graph_that_disagrees_is_not_written(tmp_path, exported, monkeypatch):
    model, post, cfg, graph, _ = exported
    out = tmp_path / "model.onnx"
    out.write_bytes(graph.read_bytes())             # an earlier export: ddetr's, replaceable
    # the trace gives this model's real graph again (the fixture's export) instead of
    # tracing for a minute: what is under test is the check and the write that follow it
    monkeypatch.setattr(export_module, "_trace",
                        lambda detector, example, path, smallest: shutil.copy(graph, path))
    impossible = {"score": -1.0, "box": -1.0}             # no graph can meet it
    with pytest.raises(ExportMismatchError, match=r"model.onnx was not written: 1 image\(s\) "
                                                  r"at 96x128: scores differ by up to"):
        export_onnx(model, post, cfg, out, tolerance=impossible)
    assert out.read_bytes() == exported[3].read_bytes()   # the earlier file stays
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]   # no temporary file


def test_compare_pairs_tied_scores_and_counts_what_has_no_partner():
    scores = np.array([[0.9, 0.5, 0.5]], np.float32)
    labels = np.array([[1, 2, 3]])
    boxes = np.array([[[0, 0, 10, 10], [1, 1, 5, 5], [2, 2, 6, 6]]], np.float32)
    swapped = (scores, labels[:, [0, 2, 1]], boxes[:, [0, 2, 1]])  # a tie, other order
    assert compare((scores, labels, boxes), swapped, 10.0) == {"score": 0.0, "box": 0.0,
                                                                 "unmatched": 0}
    relabelled = (scores, np.array([[1, 2, 4]]), boxes)
    assert compare((scores, labels, boxes), relabelled, 10.0)["unmatched"] == 1
    moved = (scores, labels, boxes + np.float32(0.01))
    assert compare((scores, labels, boxes), moved, 10.0)["box"] == pytest.approx(1e-3, rel=1e-4)
    assert not agrees(compare((scores, labels, boxes), moved, 10.0))


def test_an_existing_file_is_replaced_only_if_ddetr_wrote_it(tmp_path, exported):
    model, post, cfg, path, _ = exported
    foreign = tmp_path / "model.onnx"
    foreign.write_text("not ours")
    with pytest.raises(FileExistsError, match="was not written by ddetr's export"):
        export_onnx(model, post, cfg, foreign)
    assert foreign.read_text() == "not ours"
    with pytest.raises(ValueError, match="size 64x64 is too small for this model"):
        export_onnx(model, post, cfg, tmp_path / "small.onnx", size=(64, 64))


@pytest.mark.parametrize("args, message", [
    (["--size", "32x32"], "size 32x32 is too small for this model: each side must be at "
                          "least 65 pixels"),
    (["--size", "big"], "--size expects HEIGHTxWIDTH, e.g. 800x1066, got 'big'"),
    (["--format", "huggingface", "--size", "96x96"], "--size, --image and --threads apply "
                                                     "to --format onnx only"),
])
def test_export_mistakes_are_one_line(tmp_path, args, message):
    save_tiny(tmp_path, dec_layers=1)
    r = cli("export", "--checkpoint", "tiny.pth", "--out", "m.onnx", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"python -m ddetr export: error: {message}"], r.stderr
    assert not (tmp_path / "m.onnx").exists()
