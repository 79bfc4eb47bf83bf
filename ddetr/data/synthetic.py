"""A synthetic detection dataset, written to disk as real COCO (JPEG images + instances JSON).

Six classes that differ only by shape (circle, square, triangle, cross, star, ring);
every object gets a random colour, so colour says nothing about the class. Sizes are
log-uniform so that the set covers COCO's small (area < 32^2), medium and large ranges
at 256 x 256 pixels; objects may overlap a little; backgrounds are smooth colour noise
with line clutter and grain; every image gets a colour jitter.

Everything is a function of the seed: image i of a split is drawn from its own
generator seeded with (seed, split, i), so a set is the same on every machine, and
``generate_synthetic`` is idempotent (it rewrites nothing that is already complete).

Layout (the same as COCO 2017, so ``ddetr.data.coco`` reads both the same way)::

    root/.ddetr-synthetic                   the marker: this folder is the generator's
    root/train2017/000000000001.jpg ...
    root/val2017/...
    root/annotations/instances_train2017.json, instances_val2017.json

The generator deletes and rewrites only what it generated itself. It writes the marker
into a folder before anything else (so a generation killed half-way is still its own,
and the next call completes it), works only in a new or empty folder or one that
carries the marker, and refuses any other folder -- a real COCO folder given as
data_path with dataset=synthetic -- naming it and what it found there.
"""
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ["circle", "square", "triangle", "cross", "star", "ring"]
VERSION = 1              # bump when the drawing changes, so old sets are regenerated
SPLITS = {"train": 0, "val": 1}
MARKER = ".ddetr-synthetic"
DESCRIPTION = "ddetr synthetic shapes"


# --- shapes: each returns polygons (lists of (x, y)) in a unit frame centred at 0 ----
def _regular(n, phase=0.0):
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _shape_outline(name):
    """The outer contour of a shape, with radius ~1, as an (P, 2) array."""
    if name in ("circle", "ring"):
        return _regular(48)
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.8
    if name == "triangle":
        return _regular(3, -math.pi / 2)
    if name == "cross":
        a, b = 1.0, 0.33
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a],
                         [-b, a], [-b, b], [-a, b], [-a, -b], [-b, -b]], float)
    if name == "star":
        outer, inner = _regular(5, -math.pi / 2), _regular(5, -math.pi / 2 + math.pi / 5)
        return np.stack([outer, inner * 0.42], 1).reshape(10, 2)
    raise ValueError(f"unknown shape {name!r}; expected one of {CATEGORIES}")


def _place_shape(name, rng, cx, cy, size):
    """The shape's outline in pixels: scaled (with an aspect jitter), rotated, moved."""
    pts = _shape_outline(name)
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    pts = pts * np.array([aspect ** 0.5, aspect ** -0.5]) * (size / 2)
    if name not in ("circle", "ring"):
        t = rng.uniform(0, 2 * math.pi)
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        pts = pts @ rot.T
    return pts + np.array([cx, cy])


def _polygon_area(pts):
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


# --- one image ---------------------------------------------------------------------
def _background(rng, size):
    """Smooth two-scale colour noise, line clutter and grain: (H, W, 3) uint8."""
    h = w = size
    base = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((3, 1.0), (12, 0.45)):
        grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        up = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
        base += amp * np.asarray(up, np.float32)
    base /= 1.45
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(8, 25)):          # clutter: lines and arcs
        x0, y0 = rng.uniform(-20, size + 20, 2)
        length, angle = rng.uniform(10, size), rng.uniform(0, 2 * math.pi)
        x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.7:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))
        else:
            r = length / 3
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], rng.uniform(0, 360),
                     rng.uniform(0, 360), fill=colour, width=int(rng.integers(1, 3)))
    return img


def _overlap_ok(box, boxes):
    """Overlap allowed, but IoU < 0.3 and at most 40% of an earlier box covered."""
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in boxes:
        iw, ih = min(x1, a1) - max(x0, a0), min(y1, b1) - max(y0, b0)
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        area_new, area_old = (x1 - x0) * (y1 - y0), (a1 - a0) * (b1 - b0)
        if inter / (area_new + area_old - inter) > 0.3 or inter / area_old > 0.4:
            return False
    return True


def _luma(rgb):
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def draw_image(rng, size=256, min_size=None, max_size=None, max_objects=8):
    """One image and its objects.

    Object sizes (the side of the shape before its aspect jitter) are log-uniform in
    [min_size, max_size], by default [12, 170] pixels scaled by size / 256.

    Returns:
        image: PIL RGB image (size x size).
        objects: list of dicts with category_id (1-based), bbox [x, y, w, h] (absolute,
            the tight box of the drawn shape), area (polygon area), segmentation.
    """
    min_size = min_size or 12 * size / 256
    max_size = max_size or 170 * size / 256
    img = _background(rng, size)
    bg = np.asarray(img, np.float32)
    ss = 2                                          # supersampling for the shapes
    layer = Image.new("RGBA", (size * ss, size * ss), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    objects, boxes = [], []
    for _ in range(int(rng.integers(2, max_objects + 1))):
        placed = _place_object(rng, size, min_size, max_size, boxes)
        if placed is None:
            continue
        cls, pts, box = placed
        fill = _contrasting_colour(rng, bg, box)
        draw.polygon([tuple(p) for p in (pts * ss)], fill=fill)
        if CATEGORIES[cls] == "ring":                     # cut the hole out of the disc
            centre = pts.mean(0)
            inner = (pts - centre) * rng.uniform(0.45, 0.6) + centre
            draw.polygon([tuple(p) for p in inner * ss], fill=(0, 0, 0, 0))
        boxes.append(box)
        objects.append(_annotation(cls, pts, box, size))
    layer = layer.resize((size, size), Image.BOX)
    img = img.convert("RGBA")
    img.alpha_composite(layer)
    return _photometric_jitter(rng, img.convert("RGB")), objects


def _place_object(rng, size, min_size, max_size, boxes):
    """(class index, polygon (P, 2), box (x0, y0, x1, y1)) of a shape that lies mostly
    inside the image and overlaps the boxes placed so far little enough; None after 20
    attempts."""
    for _attempt in range(20):
        cls = int(rng.integers(len(CATEGORIES)))
        s = math.exp(rng.uniform(math.log(min_size), math.log(max_size)))
        cx, cy = rng.uniform(0.05 * size, 0.95 * size, 2)
        pts = _place_shape(CATEGORIES[cls], rng, cx, cy, s)
        x0, y0 = pts.min(0).clip(0, size)
        x1, y1 = pts.max(0).clip(0, size)
        if x1 - x0 < 0.6 * min_size or y1 - y0 < 0.6 * min_size:
            continue                             # mostly outside the image
        if _overlap_ok((x0, y0, x1, y1), boxes):
            return cls, pts, (x0, y0, x1, y1)
    return None


def _contrasting_colour(rng, bg, box):
    """An RGBA fill: a random colour, far enough in brightness from the background under
    the box (up to 10 draws)."""
    x0, y0, x1, y1 = box
    patch = bg[int(y0):int(math.ceil(y1)), int(x0):int(math.ceil(x1))]
    under = _luma(patch.reshape(-1, 3).mean(0))
    for _c in range(10):
        colour = rng.integers(0, 256, 3)
        if abs(_luma(colour) - under) > 60:
            break
    return tuple(int(c) for c in colour) + (255,)


def _annotation(cls, pts, box, size):
    """The COCO annotation of a drawn shape (its id is given when the set is written)."""
    x0, y0, x1, y1 = box
    return {"category_id": cls + 1,
            "bbox": [round(float(x0), 2), round(float(y0), 2),
                     round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
            "area": round(_polygon_area(pts.clip(0, size)), 2),
            "segmentation": [[round(float(v), 1) for v in pts.clip(0, size).reshape(-1)]],
            "iscrowd": 0}


def _photometric_jitter(rng, img):
    """Brightness, contrast, per-channel gain, grain and sometimes a blur."""
    arr = np.asarray(img, np.float32)
    mean = arr.mean()
    arr = (arr - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.75, 1.25)
    arr = arr * rng.uniform(0.85, 1.15, 3)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * rng.uniform(2, 8)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return img


# --- a whole set -------------------------------------------------------------------
def _split_meta(seed, num_images, image_size):
    return {"version": VERSION, "seed": seed, "num_images": num_images,
            "image_size": image_size}


def _draw_one(job):
    """Draw image i of a split and save it as JPEG in folder: (image record, objects)."""
    seed, split, i, image_size, folder = job
    rng = np.random.default_rng([seed, SPLITS[split], i])
    img, objects = draw_image(rng, size=image_size)
    image_id = i + 1
    name = f"{image_id:012d}.jpg"
    img.save(Path(folder) / name, quality=92)
    record = {"id": image_id, "file_name": name, "height": image_size, "width": image_size}
    return record, objects


def _map(fn, jobs, workers):
    """fn over jobs in order: in `workers` forked processes, or here when workers <= 1
    or the platform cannot fork (a spawned worker would re-import torch, slower than
    drawing the images)."""
    if workers <= 1 or len(jobs) < 2 * workers or \
            "fork" not in multiprocessing.get_all_start_methods():
        return [fn(job) for job in jobs]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


def _write_split(root, split, seed, num_images, image_size, workers=1):
    folder = root / f"{split}2017"
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    images, annotations = [], []
    ann_file.unlink(missing_ok=True)    # from here on the split is incomplete
    for stale in root.glob(f".{split}2017.*"):             # left by a killed generation
        shutil.rmtree(stale)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{split}2017.", dir=root))
    jobs = [(seed, split, i, image_size, str(tmp_dir)) for i in range(num_images)]
    for record, objects in _map(_draw_one, jobs, workers):
        images.append(record)
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": record["id"], **obj})
    coco = {
        "info": {"description": DESCRIPTION, **_split_meta(
            seed, num_images, image_size)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"}
                       for i, n in enumerate(CATEGORIES)],
    }
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp_dir, folder)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    tmp_ann = ann_file.with_suffix(".json.tmp")
    tmp_ann.write_text(json.dumps(coco))
    os.replace(tmp_ann, ann_file)       # written last: its presence means "complete"


def _info(ann_file):
    """The "info" dict of an annotation file, {} when it cannot be read."""
    try:
        with open(ann_file) as f:
            info = json.load(f).get("info", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return info if isinstance(info, dict) else {}


def _is_complete(root, split, meta):
    ann_file = root / "annotations" / f"instances_{split}2017.json"
    info = _info(ann_file) if ann_file.is_file() else {}
    return (root / f"{split}2017").is_dir() and all(info.get(k) == v for k, v in meta.items())


def claim_folder(root):
    """Make root a folder of the generator's (marked), or refuse: a FileExistsError
    when it exists, is not empty and carries no marker (it is not ours to overwrite)."""
    root = Path(root)
    if (root / MARKER).is_file():
        return
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"data_path {root} is a file; the synthetic set needs a "
                              f"folder of its own")
    entries = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if entries:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if
                                          len(entries) > 5 else "")
        raise FileExistsError(
            f"data_path {root} holds files the synthetic generator did not write ({shown}; "
            f"no {MARKER} marker): refusing to generate the synthetic set there. "
            f"Use dataset=coco to read it, or give the synthetic set a data_path of its own")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("Written by ddetr's synthetic data generator "
                               "(ddetr.data.generate_synthetic), which may delete and "
                               "rewrite what is in this folder.\n")


def check_synthetic(root, num_train=2000, num_val=200, image_size=256, seed=0):
    """Raise FileNotFoundError unless root holds exactly this synthetic set (read-only:
    for a config read from a checkpoint, whose data is not regenerated)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data_path {root} does not exist (dataset=synthetic, "
                                f"from a saved config: its data is not regenerated here; "
                                f"give data_path=<the folder of the set>)")
    for split, n in (("train", num_train), ("val", num_val)):
        meta = _split_meta(seed, n, image_size)
        if not _is_complete(root, split, meta):
            raise FileNotFoundError(
                f"data_path {root} does not hold the synthetic {split} set of this config "
                f"({', '.join(f'{k}={v}' for k, v in meta.items())}); its data is not "
                f"regenerated from a saved config: give data_path=<the folder of the set>")


def default_workers():
    """Processes for drawing: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:                       # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def generate_synthetic(root, num_train=2000, num_val=200, image_size=256, seed=0,
                       verbose=True, workers=None):
    """Write the synthetic set under ``root`` unless an identical one is already there.

    Args:
        root: output folder: new, empty, or one the generator marked as its own (any
            other folder is refused with a FileExistsError, see ``claim_folder``).
        num_train, num_val: images per split.
        image_size: side of the square images in pixels.
        seed: everything is a function of it.
        workers: processes that draw images in parallel (None: default_workers()); the
            set does not depend on it.
    Returns:
        Path of root.
    """
    root = Path(root)
    claim_folder(root)
    workers = default_workers() if workers is None else int(workers)
    for split, n in (("train", num_train), ("val", num_val)):
        meta = _split_meta(seed, n, image_size)
        if _is_complete(root, split, meta):
            continue
        if verbose:
            print(f"generating {n} synthetic {split} images in {root / (split + '2017')}")
        _write_split(root, split, seed, n, image_size, workers)
    return root
