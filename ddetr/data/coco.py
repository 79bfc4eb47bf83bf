"""A COCO-format detection dataset read through pycocotools.

Any folder laid out as COCO 2017 works -- the synthetic set and real COCO alike::

    root/{split}2017/<file_name>            images
    root/annotations/instances_{split}2017.json

Crowd annotations are left out of the training targets (COCOeval still uses them as
"ignore" regions, as in COCO and DETR); boxes with no width or height are dropped and
counted in the log; a missing or unreadable image raises an error that names it.
"""
import contextlib
import io
import logging
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


class CocoDetection(torch.utils.data.Dataset):
    """Images and targets of a COCO-format split.

    Item i is (image, target): image as the transform returns it (a float tensor
    (3, H, W) with the standard transforms), target a dict with "boxes" (T, 4) as
    (cx, cy, w, h) normalised to the transformed image, "labels" (T,) int64 COCO
    category ids, "image_id" int, "orig_size" and "size" (2,) int64 as (h, w).
    """

    def __init__(self, img_folder, ann_file, transforms=None):
        self.img_folder, self.ann_file = Path(img_folder), Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"annotation file {self.ann_file} does not exist "
                                    f"(expected a COCO-format folder: root/{{split}}2017/ "
                                    f"and root/annotations/instances_{{split}}2017.json)")
        if not self.img_folder.is_dir():
            raise FileNotFoundError(f"image folder {self.img_folder} does not exist")
        with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints timings
            try:
                self.coco = COCO(str(self.ann_file))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.ann_file} is not a valid COCO instances file: "
                                 f"{e}") from e
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
            raise OSError(f"cannot read image {path} (image_id {image_id}): {e}") from e

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
