"""A COCO-format detection dataset read through pycocotools.

Any folder laid out as COCO 2017 works -- the synthetic set and real COCO alike::

    root/{split}2017/<file_name>            images
    root/annotations/instances_{split}2017.json

Crowd annotations are left out of the training targets (COCOeval still uses them as
"ignore" regions, as in COCO and DETR); boxes with no width or height are dropped and
counted in the log.

The annotation file is checked when the dataset is opened, not mid-epoch: JSON errors
(with their line), the layout (a dict of "images", "annotations", "categories"), every
image's record and file (a cheap stat), every annotation's image id, bbox and category
id (inside the model's classes when num_classes is given). Each error is one line that
names the file and the image or annotation id. An image that turns out to be corrupt
when it is decoded during training is reported with its file name.
"""
import contextlib
import io
import json
import logging
import math
import os
from pathlib import Path

import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from .transforms import to_model_target

log = logging.getLogger(__name__)


def coco_paths(root, split):
    """(image folder, annotation file) of a split of a COCO-format folder."""
    root = Path(root)
    return root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"


# COCOeval's area ranges (pixels^2 of the annotation's "area"): small < 32^2 <= medium
# < 96^2 <= large
SIZE_CLASSES = {"small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2),
                "large": (96 ** 2, float("inf"))}


def size_class_counts(annotations):
    """{"small", "medium", "large"}: how many objects of a COCO instances dict fall into
    each of COCOeval's area ranges (crowd annotations excluded, as COCOeval does)."""
    counts = dict.fromkeys(SIZE_CLASSES, 0)
    for ann in annotations["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        for name, (low, high) in SIZE_CLASSES.items():
            if low <= ann["area"] < high:
                counts[name] += 1
    return counts


def load_annotations(ann_file, img_folder, num_classes=None):
    """The dict of a COCO instances file, checked (see the module docstring).

    Raises FileNotFoundError (the file or an image is missing), PermissionError (an
    image cannot be read), ValueError (anything malformed); each names ann_file.
    """
    ann_file, img_folder = Path(ann_file), Path(img_folder)
    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {ann_file} does not exist "
                                f"(expected a COCO-format folder: root/{{split}}2017/ "
                                f"and root/annotations/instances_{{split}}2017.json)")
    if not img_folder.is_dir():
        raise FileNotFoundError(f"image folder {img_folder} does not exist "
                                f"(the images of {ann_file})")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file}, line {e.lineno}, column {e.colno}: not valid JSON "
                         f"({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{ann_file} is not a JSON text file ({e.reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{ann_file} holds a JSON {type(data).__name__}; expected a COCO "
                         f"instances object with keys 'images', 'annotations', 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise ValueError(f"{ann_file} has no {missing} (a COCO instances file has "
                         f"'images', 'annotations' and 'categories')")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise ValueError(f"{ann_file}: '{key}' must be a list, got a "
                             f"{type(data[key]).__name__}")
    image_ids = _check_images(data["images"], ann_file, img_folder)
    _check_categories(data["categories"], ann_file)
    _check_annotations(data["annotations"], ann_file, image_ids, num_classes)
    return data


def _record(kind, i, item, ann_file, fields):
    """item must be a dict with these fields (name: types); says which one is wrong."""
    name = f"{kind} id {item['id']}" if isinstance(item, dict) and "id" in item \
        else f"{kind} #{i} of the list"
    if not isinstance(item, dict):
        raise ValueError(f"{ann_file}: {name} must be an object, got {item!r}")
    for field, types in fields.items():
        value = item.get(field)
        if not isinstance(value, types) or isinstance(value, bool):
            raise ValueError(f"{ann_file}: {name} needs '{field}' "
                             f"({' or '.join(t.__name__ for t in types)}), got {value!r}")
    return name


def _check_images(images, ann_file, img_folder):
    ids, missing = set(), []
    for i, img in enumerate(images):
        name = _record("image", i, img, ann_file, {"id": (int,), "file_name": (str,),
                                                   "width": (int, float),
                                                   "height": (int, float)})
        if img["id"] in ids:
            raise ValueError(f"{ann_file}: {name} appears twice in 'images'")
        ids.add(img["id"])
        if not (img["width"] > 0 and img["height"] > 0):
            raise ValueError(f"{ann_file}: {name} has width {img['width']} and height "
                             f"{img['height']}; expected sizes > 0")
        path = img_folder / img["file_name"]
        if not path.is_file():
            missing.append((img["id"], path))
        elif not os.access(path, os.R_OK):
            raise PermissionError(f"{ann_file}: image id {img['id']}: file {path} cannot "
                                  f"be read (permissions)")
    if missing:
        more = f" (and {len(missing) - 1} more images are missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{ann_file}: image id {missing[0][0]}: file "
                                f"{missing[0][1]} does not exist{more}")
    return ids


def _check_categories(categories, ann_file):
    for i, cat in enumerate(categories):
        _record("category", i, cat, ann_file, {"id": (int,), "name": (str,)})


def _check_annotations(annotations, ann_file, image_ids, num_classes):
    ids, outside = set(), []
    for i, ann in enumerate(annotations):
        name = _record("annotation", i, ann, ann_file, {"id": (int,), "image_id": (int,),
                                                        "category_id": (int,),
                                                        "bbox": (list,)})
        if ann["id"] in ids:
            raise ValueError(f"{ann_file}: {name} appears twice in 'annotations'")
        ids.add(ann["id"])
        name += f" (image id {ann['image_id']})"
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{ann_file}: {name} is for an image that is not in 'images'")
        bbox = ann["bbox"]
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                     and math.isfinite(v) for v in bbox):
            raise ValueError(f"{ann_file}: {name}: bbox must be [x, y, width, height] "
                             f"(4 numbers), got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{ann_file}: {name}: bbox {bbox!r} has a negative width or "
                             f"height")
        if num_classes is not None and not 0 <= ann["category_id"] < num_classes:
            outside.append(ann)
    if outside:
        top = max(a["category_id"] for a in outside)
        raise ValueError(f"{ann_file}: annotation id {outside[0]['id']} (image id "
                         f"{outside[0]['image_id']}) has category_id "
                         f"{outside[0]['category_id']}, outside the model's classes "
                         f"0..{num_classes - 1} (num_classes={num_classes}; "
                         f"{len(outside)} such annotations, ids up to {top}): set "
                         f"num_classes={top + 1} or more")


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets of a COCO-format split, checked as it opens
    (``load_annotations``; num_classes: category ids must lie in [0, num_classes)).

    Item i is (image, target): image as the transform returns it (a float tensor
    (3, H, W) with the standard transforms), target a dict with "boxes" (T, 4) as
    (cx, cy, w, h) normalised to the transformed image, "labels" (T,) int64 COCO
    category ids, "image_id" int, "orig_size" and "size" (2,) int64 as (h, w).
    """

    def __init__(self, img_folder, ann_file, transforms=None, num_classes=None):
        self.img_folder, self.ann_file = Path(img_folder), Path(ann_file)
        data = load_annotations(self.ann_file, self.img_folder, num_classes)
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints timings
            self.coco.createIndex()
        self.ids = sorted(self.coco.imgs)
        self.transforms = transforms
        self.num_degenerate = sum(not self._valid(a, self.coco.imgs[a["image_id"]])
                                  for a in self.coco.anns.values() if not a.get("iscrowd"))
        if self.num_degenerate:
            log.warning("%s: dropped %d degenerate boxes (no width or height)",
                        self.ann_file, self.num_degenerate)

    @staticmethod
    def _valid(ann, img_info):
        x, y, w, h = ann["bbox"]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, img_info["width"]), min(y + h, img_info["height"])
        return x1 > x0 and y1 > y0

    def __len__(self):
        return len(self.ids)

    def load_image(self, image_id):
        path = self.img_folder / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image {path} (image_id {image_id}, listed in "
                                    f"{self.ann_file}) does not exist") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise OSError(f"cannot read image {path} (image_id {image_id}, listed in "
                          f"{self.ann_file}): {e}") from e

    def load_target(self, image_id, width, height):
        anns = self.coco.imgToAnns.get(image_id, [])
        info = {"width": width, "height": height}
        anns = [a for a in anns if not a.get("iscrowd") and self._valid(a, info)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]                      # xywh -> xyxy
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
        return {"boxes": boxes,
                "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)}

    def __getitem__(self, index):
        image_id = self.ids[index]
        img = self.load_image(image_id)
        w, h = img.size
        target = self.load_target(image_id, w, h)
        target["boxes"] = tv_tensors.wrap(target["boxes"].clamp(min=0), like=target["boxes"])
        if self.transforms is not None:
            img, target = self.transforms(img, target)
        target = to_model_target(img, target)
        target["image_id"] = image_id
        target["orig_size"] = torch.tensor([h, w], dtype=torch.int64)
        return img, target
