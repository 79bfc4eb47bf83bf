"""ONNX export, checked against ONNX Runtime itself: the graph is standard operators
(GridSample for the deformable attention), it takes other batch and image sizes than
it was traced at, it agrees with PyTorch, a graph that disagrees is never written, and
the command line does it end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from ddetr.config import get_config
from ddetr.engine.checkpoint import save_checkpoint
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


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, post, cfg = tiny_model()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    report = export_onnx(model, post, cfg, path, categories={1: "circle"})
    return model, post, cfg, path, report


def test_the_graph_is_standard_onnx_with_gridsample_attention(exported):
    *_, path, report = exported
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph, full_check=True)
    ops = {(n.domain or "ai.onnx", n.op_type) for n in graph.graph.node}
    assert all(domain == "ai.onnx" for domain, _ in ops), ops        # no custom operator
    samplers = [n for n in graph.graph.node if n.op_type == "GridSample"]
    assert len(samplers) == 3 * 4       # 3 attention layers (1 encoder, 2 decoder) x 4 levels
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in samplers[0].attribute}
    assert attrs == {"align_corners": 0, "mode": b"linear", "padding_mode": b"zeros"}
    meta = {p.key: p.value for p in graph.metadata_props}
    assert graph.producer_name == "ddetr" and meta["min_side"] == str(report["min_side"])
    assert json.loads(meta["categories"]) == {"1": "circle"}
    assert [i.name for i in graph.graph.input] == ["images", "sizes"]


def test_the_export_checked_two_sizes_and_agreed(exported):
    *_, report = exported
    shapes = [c["shape"] for c in report["checks"]]
    assert shapes == [[1, 96, 128], [2, 72, 96]]          # batch 1 and 2, two image sizes
    for check in report["checks"]:
        assert agrees(check) and check["unmatched"] == 0
        assert check["score"] <= TOLERANCE["score"] and check["box"] <= TOLERANCE["box"]


def test_onnx_runtime_matches_pytorch_at_a_size_and_batch_never_traced(exported):
    model, post, _, path, report = exported
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
    model, *_, path, report = exported
    assert report["min_side"] == min_side(model) == 65      # 4 levels: stride 64, + 1
    with pytest.raises(ValueError, match=r"at least 65 pixels on each side.*got 64x100"):
        run_onnx(onnx_session(path), np.zeros((1, 3, 64, 100), np.float32),
                 np.array([[64, 100]]))


def test_a_graph_that_disagrees_is_not_written(tmp_path):
    model, post, cfg = tiny_model(enc_layers=1, dec_layers=1)
    out = tmp_path / "bad.onnx"
    impossible = {"score": -1.0, "box": -1.0}             # no graph can meet it
    with pytest.raises(ExportMismatchError, match=r"bad.onnx was not written: 1 image\(s\) "
                                                  r"at 96x128: scores differ by up to"):
        export_onnx(model, post, cfg, out, tolerance=impossible)
    assert list(tmp_path.iterdir()) == []                 # nor any temporary file


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


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "ddetr", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_the_export_command_writes_a_checked_graph(tmp_path):
    model, _, cfg = tiny_model(dec_layers=1)
    from ddetr.engine.checkpoint import config_record
    save_checkpoint({"model": model.state_dict(), "config": config_record(cfg),
                     "categories": {1: "circle"}}, tmp_path / "tiny.pth")
    Image.new("RGB", (120, 90), (200, 30, 30)).save(tmp_path / "red.png")
    r = cli("export", "--checkpoint", "tiny.pth", "--format", "onnx", "--out", "m.onnx",
            "--size", "80x100", "--image", "red.png", "--threads", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ONNX Runtime vs PyTorch, 1 image(s) at 80x100: scores within")
    assert lines[1].startswith("ONNX Runtime vs PyTorch, 2 image(s) at 65x75:")
    assert lines[2].startswith("wrote m.onnx (opset 20; any batch size, images of at least "
                               "65 pixels a side)")
    assert r.stderr == "", r.stderr                        # the exporter's chatter is quiet
    assert onnx.load(str(tmp_path / "m.onnx")).producer_name == "ddetr"


@pytest.mark.parametrize("args, message", [
    (["--size", "32x32"], "size 32x32 is too small for this model: each side must be at "
                          "least 65 pixels"),
    (["--size", "big"], "--size expects HEIGHTxWIDTH, e.g. 800x1066, got 'big'"),
    (["--format", "huggingface", "--size", "96x96"], "--size, --image and --threads apply "
                                                     "to --format onnx only"),
])
def test_export_mistakes_are_one_line(tmp_path, args, message):
    model, _, cfg = tiny_model(dec_layers=1)
    from ddetr.engine.checkpoint import config_record
    save_checkpoint({"model": model.state_dict(), "config": config_record(cfg)},
                    tmp_path / "tiny.pth")
    r = cli("export", "--checkpoint", "tiny.pth", "--out", "m.onnx", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"python -m ddetr export: error: {message}"], r.stderr
    assert not (tmp_path / "m.onnx").exists()
