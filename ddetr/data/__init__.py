"""Data: the synthetic COCO-format set, the COCO loader, transforms and collate.

``ensure_data(cfg)`` is the one place that prepares the data of a run: it generates the
synthetic set (only ever in the generator's own folders) or checks it, and opens and
checks a COCO folder's annotation files, so that a mistake in the data is reported
before any training. ``build_dataset(split, cfg)`` then opens a split.
"""
from pathlib import Path

from .coco import CocoDetection, coco_paths, load_annotations, size_class_counts
from .collate import collate
from .synthetic import CATEGORIES, check_synthetic, draw_image, generate_synthetic
from .transforms import IMAGENET_MEAN, IMAGENET_STD, make_transforms

DATASETS = ("coco", "synthetic")


def ensure_data(cfg, generate=True, splits=("train", "val")):
    """Prepare the data a run of cfg needs; errors name the folder, file and image.

    dataset "synthetic": generate the set under cfg.data_path (a no-op when it is there;
    a folder the generator did not make is refused), or with generate=False (a config
    read from a checkpoint) only check that it is there. dataset "coco": open and check
    the annotation files of the splits (and that their images exist).

    Returns the Path of cfg.data_path.
    """
    root = Path(cfg.data_path)
    if cfg.dataset == "synthetic":
        _prepare_synthetic(cfg, generate)
    else:
        for split in splits:
            _open(split, cfg, transforms=None)
    return root


def _prepare_synthetic(cfg, generate):
    args = (cfg.data_path, cfg.synthetic_train_images, cfg.synthetic_val_images,
            cfg.synthetic_image_size, cfg.synthetic_seed)
    if generate:
        generate_synthetic(*args, verbose=True)
    else:
        check_synthetic(*args)


def build_dataset(split, cfg, generate=True):
    """The dataset of a split ("train" or "val") for a Config, checked as it opens.

    cfg.dataset "synthetic" first generates the set (see ``ensure_data``; with
    generate=False it must already be there); "coco" reads cfg.data_path as a
    COCO-format folder.
    """
    if cfg.dataset == "synthetic":
        _prepare_synthetic(cfg, generate)
    transforms = make_transforms(split == "train", cfg.train_scales, cfg.max_size,
                                 cfg.val_scale)
    return _open(split, cfg, transforms)


def _open(split, cfg, transforms):
    root = Path(cfg.data_path)
    if not root.is_dir():
        raise FileNotFoundError(f"data_path {root} does not exist (dataset={cfg.dataset}; "
                                f"expected a COCO-format folder)")
    folder, ann_file = coco_paths(root, split)
    dataset = CocoDetection(folder, ann_file, transforms, num_classes=cfg.num_classes)
    if len(dataset) == 0:
        raise ValueError(f"{ann_file} lists no images: the {split} split of data_path "
                         f"{root} is empty, there is nothing to train on or evaluate")
    return dataset


__all__ = ["CocoDetection", "coco_paths", "load_annotations", "size_class_counts", "collate",
           "CATEGORIES", "DATASETS", "draw_image", "generate_synthetic", "check_synthetic",
           "make_transforms", "build_dataset", "ensure_data", "IMAGENET_MEAN",
           "IMAGENET_STD"]
