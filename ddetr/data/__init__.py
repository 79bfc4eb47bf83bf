"""Data: the synthetic COCO-format set, the COCO loader, transforms and collate."""
from pathlib import Path

from .coco import CocoDetection, coco_paths
from .collate import collate
from .synthetic import CATEGORIES, draw_image, generate_synthetic
from .transforms import IMAGENET_MEAN, IMAGENET_STD, make_transforms


def build_dataset(split, cfg):
    """The dataset of a split ("train" or "val") for a Config.

    cfg.dataset "synthetic" first generates the set under cfg.data_path (a no-op when it
    is already there); "coco" reads cfg.data_path as a COCO-format folder.
    """
    if cfg.dataset == "synthetic":
        generate_synthetic(cfg.data_path, cfg.synthetic_train_images,
                           cfg.synthetic_val_images, cfg.synthetic_image_size,
                           cfg.synthetic_seed, verbose=True)
    elif cfg.dataset != "coco":
        raise ValueError(f"unknown dataset {cfg.dataset!r}; expected 'coco' or 'synthetic'")
    root = Path(cfg.data_path)
    if not root.is_dir():
        raise FileNotFoundError(f"data path {root} does not exist (cfg.data_path; "
                                f"expected a COCO-format folder)")
    folder, ann_file = coco_paths(root, split)
    transforms = make_transforms(split == "train", cfg.train_scales, cfg.max_size,
                                 cfg.val_scale)
    return CocoDetection(folder, ann_file, transforms)


__all__ = ["CocoDetection", "coco_paths", "collate", "CATEGORIES", "draw_image",
           "generate_synthetic", "make_transforms", "build_dataset", "IMAGENET_MEAN",
           "IMAGENET_STD"]
