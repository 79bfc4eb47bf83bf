"""The synthetic set, the COCO loader, transforms and collate."""
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from ddetr.config import get_config
from ddetr.data import (CATEGORIES, CocoDetection, build_dataset, collate, draw_image,
                        ensure_data, generate_synthetic, make_transforms)
from ddetr.data.synthetic import MARKER
from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD, check_resizable

ANN = "annotations/instances_{}2017.json"
ROOT = Path(__file__).resolve().parents[1]
CLI_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}          # this worktree's ddetr


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "s", 6, 3, 128, seed=1,
                              verbose=False, workers=2)       # drawn by two processes


# --- the synthetic generator ---------------------------------------------------------
def test_generator_is_deterministic_and_idempotent(tiny_set, tmp_path):
    # the same files whether two processes or this one draw them
    other = generate_synthetic(tmp_path / "again", 6, 3, 128, seed=1, verbose=False,
                               workers=1)
    for split in ("train", "val"):
        assert (tiny_set / ANN.format(split)).read_text() == \
               (other / ANN.format(split)).read_text()
    for f in sorted((tiny_set / "train2017").iterdir()):
        assert f.read_bytes() == (other / "train2017" / f.name).read_bytes()
    # a second call with the same arguments rewrites nothing
    stamp = (other / ANN.format("train")).stat().st_mtime_ns
    generate_synthetic(other, 6, 3, 128, seed=1, verbose=False)
    assert (other / ANN.format("train")).stat().st_mtime_ns == stamp
    # another seed, another set
    third = generate_synthetic(tmp_path / "seed2", 6, 3, 128, seed=2, verbose=False)
    assert (third / ANN.format("train")).read_text() != (other / ANN.format("train")).read_text()


def test_generator_writes_valid_coco(tiny_set):
    for split, n in (("train", 6), ("val", 3)):
        coco = COCO(str(tiny_set / ANN.format(split)))
        assert len(coco.imgs) == n
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CATEGORIES
        assert len(CATEGORIES) >= 6
        for img in coco.imgs.values():
            assert (tiny_set / f"{split}2017" / img["file_name"]).is_file()
            anns = coco.imgToAnns[img["id"]]
            assert len(anns) >= 1
            for a in anns:
                x, y, w, h = a["bbox"]
                assert w > 0 and h > 0 and x >= 0 and y >= 0
                assert x + w <= img["width"] + 1e-6 and y + h <= img["height"] + 1e-6
                assert a["area"] > 0 and a["iscrowd"] == 0


def test_sizes_cover_small_medium_large_and_images_hold_several_objects():
    areas, counts, classes = [], [], []
    for i in range(60):
        _, objects = draw_image(np.random.default_rng([7, i]), size=256)
        areas += [o["area"] for o in objects]
        classes += [o["category_id"] for o in objects]
        counts.append(len(objects))
    areas = np.array(areas)
    small, large = (areas < 32 ** 2).mean(), (areas > 96 ** 2).mean()
    medium = 1 - small - large
    assert small > 0.2 and medium > 0.2 and large > 0.05, (small, medium, large)
    assert np.mean(counts) >= 3 and max(counts) >= 6
    assert set(classes) == set(range(1, len(CATEGORIES) + 1))


def test_colour_does_not_tell_the_class():
    """The mean colour inside a box is about the same for every class."""
    means = {c: [] for c in range(1, 7)}
    for i in range(40):
        img, objects = draw_image(np.random.default_rng([3, i]), size=256)
        arr = np.asarray(img, np.float32)
        for o in objects:
            x, y, w, h = (int(round(v)) for v in o["bbox"])
            if w > 4 and h > 4:
                means[o["category_id"]].append(arr[y:y + h, x:x + w].mean())
    per_class = [np.mean(v) for v in means.values()]
    assert max(per_class) - min(per_class) < 40


# --- the COCO loader -----------------------------------------------------------------
def _write_coco(root, images, annotations, split="train"):
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / ANN.format(split)).write_text(json.dumps(coco))


def test_loader_drops_crowd_and_degenerate_boxes(tmp_path, caplog):
    Image.new("RGB", (40, 30)).save(tmp_path / "im.jpg")
    _write_coco(tmp_path, [{"id": 5, "file_name": "im.jpg", "width": 40, "height": 30}], [
        {"id": 1, "image_id": 5, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
        {"id": 2, "image_id": 5, "category_id": 2, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1},
        {"id": 3, "image_id": 5, "category_id": 2, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0},
        {"id": 4, "image_id": 5, "category_id": 2, "bbox": [50, 5, 3, 3], "area": 9, "iscrowd": 0},
    ])
    (tmp_path / "train2017" / "im.jpg").write_bytes((tmp_path / "im.jpg").read_bytes())
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path / "train2017", tmp_path / ANN.format("train"))
    assert ds.num_degenerate == 2
    assert "dropped 2 degenerate boxes" in caplog.text
    img, t = ds[0]
    assert t["labels"].tolist() == [1] and t["image_id"] == 5
    assert t["orig_size"].tolist() == [30, 40] and t["size"].tolist() == [30, 40]
    # (cx, cy, w, h) normalised to the image
    assert torch.allclose(t["boxes"], torch.tensor([[7 / 40, 7 / 30, 10 / 40, 8 / 30]]))


def test_missing_images_are_named_at_open_corrupt_ones_when_read(tmp_path):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "train2017" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    _write_coco(tmp_path, [{"id": 1, "file_name": "gone.jpg", "width": 8, "height": 8},
                           {"id": 2, "file_name": "bad.jpg", "width": 8, "height": 8}], [])
    with pytest.raises(FileNotFoundError, match="image id 1: file .*gone.jpg does not exist"):
        CocoDetection(tmp_path / "train2017", tmp_path / ANN.format("train"))
    _write_coco(tmp_path, [{"id": 2, "file_name": "bad.jpg", "width": 8, "height": 8}], [])
    ds = CocoDetection(tmp_path / "train2017", tmp_path / ANN.format("train"))
    with pytest.raises(OSError, match="cannot read image .*bad.jpg .image_id 2"):
        ds[0]
    # through a DataLoader worker, the CLI's one line is still the image's
    from ddetr.cli import one_line
    loader = torch.utils.data.DataLoader(ds, num_workers=1, collate_fn=collate)
    with pytest.raises(OSError) as info:
        next(iter(loader))
    assert one_line(info.value).startswith("OSError: cannot read image")
    assert "bad.jpg" in one_line(info.value) and "\n" not in one_line(info.value)


def test_wrong_data_path_is_a_clear_error(tmp_path):
    cfg = get_config("cpu", {"dataset": "coco", "data_path": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("train", cfg)
    (tmp_path / "empty").mkdir()
    cfg = get_config("cpu", {"dataset": "coco", "data_path": str(tmp_path / "empty")})
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        build_dataset("val", cfg)


def test_synthetic_goes_through_the_coco_loader(tiny_set):
    cfg = get_config("cpu", {"data_path": str(tiny_set), "synthetic_train_images": 6,
                             "synthetic_val_images": 3, "synthetic_image_size": 128,
                             "synthetic_seed": 1, "train_scales": [96, 128],
                             "max_size": 128, "val_scale": 128})
    ds = build_dataset("val", cfg)
    assert isinstance(ds, CocoDetection) and len(ds) == 3
    img, t = ds[0]
    assert img.shape == (3, 128, 128) and img.dtype == torch.float32
    assert t["boxes"].shape[1] == 4 and (t["boxes"] >= 0).all() and (t["boxes"] <= 1).all()


# --- transforms and collate ------------------------------------------------------------
def _bright_box(img):
    """x0y0x1y1 of the pixels brighter than 0.5 in an un-normalised image."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    bright = ((img * std + mean).mean(0) > 0.5).nonzero()
    if len(bright) == 0:
        return None
    return torch.tensor([bright[:, 1].min(), bright[:, 0].min(),
                         bright[:, 1].max() + 1, bright[:, 0].max() + 1], dtype=torch.float32)


def test_train_transforms_keep_boxes_on_the_object():
    """A white rectangle on black, through flip / resize / crop: its box must follow it."""
    arr = np.zeros((200, 300, 3), np.uint8)
    arr[40:100, 30:130] = 255                      # the object: x 30..130, y 40..100
    image = Image.fromarray(arr)
    transform = make_transforms(True, [160, 192, 224], 320)
    flipped = kept = 0
    for seed in range(40):
        torch.manual_seed(seed)
        boxes = tv_tensors.BoundingBoxes([[30, 40, 130, 100]], format="XYXY",
                                         canvas_size=(200, 300))
        img, t = transform(image, {"boxes": boxes, "labels": torch.tensor([1])})
        h, w = img.shape[-2:]
        assert max(h, w) <= 320
        found = _bright_box(img)
        if len(t["boxes"]) == 0:                   # cropped away: (almost) nothing left
            assert found is None or ((found[2:] - found[:2]).prod() < 4)
            continue
        kept += 1
        box = t["boxes"][0].float()
        assert found is not None
        # resampling blurs the edges by about the scale factor: compare within a few
        # pixels and by IoU
        assert (box - found).abs().max() < 4, (seed, box, found)
        inter = (torch.min(box[2:], found[2:]) - torch.max(box[:2], found[:2])).clamp(min=0)
        union = (box[2:] - box[:2]).prod() + (found[2:] - found[:2]).prod() - inter.prod()
        assert inter.prod() / union > 0.8, (seed, box, found)
        flipped += bool(box[0] > w / 2 - 1)        # the object started on the left
    assert kept >= 20 and 0 < flipped < kept


def test_val_transform_resizes_boxes_exactly():
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[10:30, 20:60] = 255
    transform = make_transforms(False, [128], 512, val_scale=150)
    boxes = tv_tensors.BoundingBoxes([[20, 10, 60, 30]], format="XYXY", canvas_size=(100, 200))
    img, t = transform(Image.fromarray(arr), {"boxes": boxes, "labels": torch.tensor([1])})
    assert img.shape[-2:] == (150, 300)
    assert torch.allclose(t["boxes"].float(), torch.tensor([[30., 15., 90., 45.]]))
    assert torch.allclose(t["boxes"][0].float(), _bright_box(img), atol=1.5)


def test_collate_pads_with_masks():
    a = (torch.ones(3, 4, 6), {"id": 0})
    b = (torch.ones(3, 5, 3), {"id": 1})
    images, masks, targets = collate([a, b])
    assert images.shape == (2, 3, 5, 6) and masks.shape == (2, 5, 6)
    assert masks.dtype == torch.bool
    assert not masks[0, :4, :].any() and masks[0, 4, :].all()
    assert not masks[1, :, :3].any() and masks[1, :, 3:].all()
    assert (images[~masks.unsqueeze(1).expand_as(images)] == 1).all()
    assert (images[masks.unsqueeze(1).expand_as(images)] == 0).all()
    assert [t["id"] for t in targets] == [0, 1]


# --- the generator writes only in its own folders -------------------------------------
def _coco_folder(root):
    """A real-looking COCO folder: images, annotation files and an unrelated file."""
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(root / f"{split}2017" / "a.jpg")
    _write_coco(root, [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
                [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 8],
                  "area": 80, "iscrowd": 0}], "train")
    _write_coco(root, [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}], [],
                "val")
    (root / "README.txt").write_text("my notes, not a dataset file")
    return root


def _snapshot(root):
    """Every file under root and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_generator_refuses_a_folder_it_did_not_make(tmp_path):
    coco = _coco_folder(tmp_path / "coco")
    before = _snapshot(coco)
    with pytest.raises(FileExistsError, match=r"data_path .*coco holds files the synthetic "
                                              r"generator did not write \(README.txt, "
                                              r"annotations, train2017, val2017; no "
                                              r"\.ddetr-synthetic marker\)"):
        generate_synthetic(coco, 2, 1, 64, verbose=False)
    cfg = get_config("cpu", {"data_path": str(coco)})            # dataset=synthetic
    with pytest.raises(FileExistsError, match="refusing to generate"):
        ensure_data(cfg)
    with pytest.raises(FileExistsError, match="refusing to generate"):
        build_dataset("val", cfg)
    assert _snapshot(coco) == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        generate_synthetic(tmp_path / "file", 2, 1, 64, verbose=False)


def test_generator_marks_its_folders_and_completes_a_killed_generation(tmp_path):
    (tmp_path / "empty").mkdir()                                  # nothing to lose here
    root = generate_synthetic(tmp_path / "empty", 3, 2, 64, verbose=False)
    assert (root / MARKER).is_file()
    stamp = (root / ANN.format("train")).stat().st_mtime_ns
    # what a generation killed while drawing the val images leaves behind
    (root / ANN.format("val")).unlink()
    (root / "val2017" / "000000000001.jpg").unlink()
    (root / ".val2017.abc123").mkdir()
    (root / ".val2017.abc123" / "000000000001.jpg").write_bytes(b"half")
    generate_synthetic(root, 3, 2, 64, verbose=False)
    assert not list(root.glob(".val2017.*"))
    assert len(COCO(str(root / ANN.format("val"))).imgs) == 2
    assert sorted(p.name for p in (root / "val2017").iterdir()) == \
        ["000000000001.jpg", "000000000002.jpg"]
    assert (root / ANN.format("train")).stat().st_mtime_ns == stamp   # untouched
    # without its marker the folder is no longer the generator's to rewrite
    (root / MARKER).unlink()
    with pytest.raises(FileExistsError, match=r"no \.ddetr-synthetic marker"):
        generate_synthetic(root, 3, 2, 64, verbose=False)
    assert (root / ANN.format("train")).stat().st_mtime_ns == stamp


def test_a_saved_config_never_generates(tmp_path):
    cfg = get_config("cpu", {"data_path": str(tmp_path / "gone"), "synthetic_train_images": 3,
                             "synthetic_val_images": 2, "synthetic_image_size": 64})
    with pytest.raises(FileNotFoundError, match=r"data_path .*gone does not exist "
                                                r"\(dataset=synthetic"):
        ensure_data(cfg, generate=False)
    with pytest.raises(FileNotFoundError, match="gone does not exist"):
        build_dataset("val", cfg, generate=False)
    assert not (tmp_path / "gone").exists()
    coco = _coco_folder(tmp_path / "coco")
    before = _snapshot(coco)
    cfg = get_config("cpu", {"data_path": str(coco)})
    with pytest.raises(FileNotFoundError, match=r"coco does not hold the synthetic train "
                                                r"set of this config"):
        ensure_data(cfg, generate=False)
    assert _snapshot(coco) == before
    generate_synthetic(tmp_path / "s", 3, 2, 64, verbose=False)
    cfg = get_config("cpu", {"data_path": str(tmp_path / "s"), "synthetic_train_images": 3,
                             "synthetic_val_images": 2, "synthetic_image_size": 64})
    assert ensure_data(cfg, generate=False) == tmp_path / "s"
    assert len(build_dataset("val", cfg, generate=False)) == 2


def _tiny_cli_config(data_path, run_dir):
    return ["d_model=32", "n_heads=2", "enc_layers=1", "dec_layers=1", "dim_feedforward=64",
            "num_queries=10", "num_feature_levels=1", "two_stage=false", "dn_detr=false",
            "with_box_refine=false", "attention_backend=reference", "device=cpu",
            "synthetic_train_images=4", "synthetic_val_images=2", "synthetic_image_size=64",
            "train_scales=[64]", "max_size=64", "val_scale=64", "batch_size=2",
            "epochs=1", f"data_path={data_path}", f"output_dir={run_dir}"]


def test_train_and_evaluate_cli_leave_a_coco_folder_untouched(tmp_path):
    """The cpu preset is dataset=synthetic; pointed at a real COCO folder, neither train
    nor evaluate may delete or rewrite a byte of it."""
    from ddetr.config import config_to_dict
    from ddetr.models import build_model

    coco = _coco_folder(tmp_path / "coco")
    before = _snapshot(coco)
    overrides = _tiny_cli_config(coco, tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "ddetr", "train", *overrides], cwd=tmp_path,
                       env=CLI_ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "refusing to generate the synthetic set" in r.stderr and str(coco) in r.stderr
    assert _snapshot(coco) == before
    # a checkpoint whose config says synthetic data, evaluated on the COCO folder
    cfg = get_config("cpu", [o for o in overrides if not o.startswith("data_path")])
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"model": build_model(cfg)[0].state_dict(), "config": config_to_dict(cfg)},
               ckpt)
    r = subprocess.run([sys.executable, "-m", "ddetr", "evaluate", "--checkpoint", str(ckpt),
                        f"data_path={coco}", "--device", "cpu"], cwd=tmp_path, env=CLI_ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "does not hold the synthetic train set of this config" in r.stderr
    assert _snapshot(coco) == before
    assert not (tmp_path / "data").exists()          # nothing generated in the cwd either


# --- COCO files are checked when opened --------------------------------------------------
GOOD_IMAGE = {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}
GOOD_ANN = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12,
            "iscrowd": 0}


def _with(**changes):
    data = {"images": [dict(GOOD_IMAGE)], "annotations": [dict(GOOD_ANN)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    for path, value in changes.items():
        key, _, field = path.partition("__")
        if field:
            data[key][0][field] = value
        else:
            data[key] = value
    return json.dumps(data)


MALFORMED = [
    ("not json", '{"images": [,]}', ValueError,
     r"instances_train2017.json, line 1, column 13: not valid JSON"),
    ("a list", "[]", ValueError, r"instances_train2017.json holds a JSON list; expected a "
                                 r"COCO instances object"),
    ("no annotations", json.dumps({"images": [], "categories": []}), ValueError,
     r"instances_train2017.json has no \['annotations'\]"),
    ("images not a list", _with(images={}), ValueError, "'images' must be a list"),
    ("image without file", _with(images__file_name=None), ValueError,
     "image id 1 needs 'file_name'"),
    ("image without size", _with(images__width=0), ValueError,
     "image id 1 has width 0 and height 30"),
    ("image missing", _with(images__file_name="b.jpg"), FileNotFoundError,
     r"image id 1: file .*b.jpg does not exist"),
    ("bbox arity", _with(annotations__bbox=[1, 2, 3]), ValueError,
     r"annotation id 7 \(image id 1\): bbox must be \[x, y, width, height\] \(4 numbers\), "
     r"got \[1, 2, 3\]"),
    ("bbox negative", _with(annotations__bbox=[1, 2, -3, 4]), ValueError,
     r"annotation id 7 \(image id 1\): bbox \[1, 2, -3, 4\] has a negative width"),
    ("unknown image", _with(annotations__image_id=9), ValueError,
     r"annotation id 7 \(image id 9\) is for an image that is not in 'images'"),
    ("category outside", _with(annotations__category_id=5), ValueError,
     r"annotation id 7 \(image id 1\) has category_id 5, outside the model's classes 0..2 "
     r"\(num_classes=3"),
    ("annotation without category", _with(annotations__category_id="a"), ValueError,
     "annotation id 7 needs 'category_id'"),
]


@pytest.mark.parametrize("text, error, pattern", [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_annotations_are_named_at_open(tmp_path, text, error, pattern):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "train2017" / "a.jpg")
    (tmp_path / ANN.format("train")).write_text(text)
    with pytest.raises(error, match=pattern):
        CocoDetection(tmp_path / "train2017", tmp_path / ANN.format("train"), num_classes=3)


def test_missing_annotation_file_and_unreadable_image_are_named(tmp_path):
    (tmp_path / "train2017").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_train2017.json does not exist"):
        CocoDetection(tmp_path / "train2017", tmp_path / ANN.format("train"))
    if os.geteuid() == 0:
        return                              # root reads every file whatever its mode
    Image.new("RGB", (40, 30)).save(tmp_path / "train2017" / "a.jpg")
    (tmp_path / "train2017" / "a.jpg").chmod(0)
    _write_coco(tmp_path, [GOOD_IMAGE], [])
    with pytest.raises(PermissionError, match=r"image id 1: file .*a.jpg cannot be read"):
        CocoDetection(tmp_path / "train2017", tmp_path / ANN.format("train"))


def test_coco_run_data_checked_by_ensure_data(tmp_path):
    coco = _coco_folder(tmp_path / "coco")
    cfg = get_config("cpu", {"dataset": "coco", "data_path": str(coco), "num_classes": 3})
    assert ensure_data(cfg) == coco
    _write_coco(coco, [], [], "val")                            # an empty split
    with pytest.raises(ValueError, match=r"instances_val2017.json lists no images: the val "
                                         r"split of data_path .*coco is empty"):
        ensure_data(cfg)
    cfg = get_config("cpu", {"dataset": "coco", "data_path": str(coco), "num_classes": 1})
    with pytest.raises(ValueError, match=r"category_id 1, outside the model's classes 0..0"):
        build_dataset("train", cfg)


# --- evaluation says what it could not measure -------------------------------------------
def test_unmeasured_metrics_are_none_and_print_na(tmp_path):
    from ddetr.engine.evaluate import check_categories, coco_eval, format_table

    # one large object only: APs and APm have nothing to be measured on
    _write_coco(tmp_path, [{"id": 1, "file_name": "a.jpg", "width": 300, "height": 300}],
                [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 200, 200],
                  "area": 40000, "iscrowd": 0}], "val")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(tmp_path / ANN.format("val")))
    hit = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 200, 200], "score": 0.9}]
    for results in (hit, []):
        stats, _ = coco_eval(gt, results)
        assert stats["APs"] is None and stats["APm"] is None, stats
        assert stats["APl"] == pytest.approx(1.0 if results else 0.0)
        assert stats["AP"] == pytest.approx(1.0 if results else 0.0)
    table = format_table(stats)
    assert table.split("\n")[1].split() == ["0.000", "0.000", "0.000", "n/a", "n/a", "0.000"]
    with pytest.raises(ValueError, match="no images to evaluate"):
        coco_eval(gt, hit, image_ids=[])
    with pytest.raises(ValueError, match=r"category ids \[1\] that the model does not know "
                                         r"\(num_classes=1"):
        check_categories(gt, 1)


@pytest.mark.parametrize("width, height", [(512, 8), (513, 8), (8, 600), (2000, 3), (1, 1)])
def test_check_resizable_agrees_with_the_resize_itself(width, height):
    """An image is refused exactly when torchvision's evaluation resize would leave it
    without a pixel on a side (scale 64, max_size 64: the longer side at most 64 times
    the shorter)."""
    transform = make_transforms(False, [64], 64, 64)
    target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY",
                                                canvas_size=(height, width)),
              "labels": torch.zeros(0, dtype=torch.int64)}
    try:
        tensor, _ = transform(Image.new("RGB", (width, height)), target)
        resized = min(tensor.shape[1:]) >= 1
    except RuntimeError:                     # torch's resize refuses a 0-pixel side
        resized = False
    try:
        check_resizable(width, height, 64, 64)
        accepted = True
    except ValueError as e:
        assert f"image is {width}x{height} pixels" in str(e)
        accepted = False
    assert accepted == resized == (max(width, height) <= 64 * min(width, height))
