"""The synthetic set, the COCO loader, transforms and collate."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from ddetr.config import get_config
from ddetr.data import (CATEGORIES, CocoDetection, build_dataset, collate, draw_image,
                        generate_synthetic, make_transforms)
from ddetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD

ANN = "annotations/instances_{}2017.json"


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


def test_missing_and_corrupt_images_are_named(tmp_path):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "train2017" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    _write_coco(tmp_path, [{"id": 1, "file_name": "gone.jpg", "width": 8, "height": 8},
                           {"id": 2, "file_name": "bad.jpg", "width": 8, "height": 8}], [])
    ds = CocoDetection(tmp_path / "train2017", tmp_path / ANN.format("train"))
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        ds[0]
    with pytest.raises(OSError, match="bad.jpg"):
        ds[1]


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
