"""COCO evaluation with pycocotools: AP, AP50, AP75, APs, APm, APl.

Every process predicts its share of the validation images; the detections are gathered
on rank 0, which runs COCOeval, and the numbers are sent back to every process.

A number is reported only when it was measured: a metric with no ground-truth objects
(COCOeval's -1, e.g. APs on a split without small objects) is None and prints "n/a";
a split with no images, or with categories the model cannot predict, is an error that
says what is missing.
"""
import contextlib
import io
import sys

import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from ..data.coco import SIZE_CLASSES
from . import distributed as dist
from .precision import autocast

METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def to_coco_results(detections, image_ids):
    """Postprocessor output (absolute x0y0x1y1) -> COCO result dicts (xywh)."""
    results = []
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].float().cpu()
        boxes[:, 2:] -= boxes[:, :2]
        for box, score, label in zip(boxes.tolist(), det["scores"].tolist(),
                                     det["labels"].tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label),
                            "bbox": [round(v, 2) for v in box], "score": round(score, 5)})
    return results


AREAS = {"APs": SIZE_CLASSES["small"], "APm": SIZE_CLASSES["medium"],
         "APl": SIZE_CLASSES["large"]}


def coco_eval(coco_gt, results, image_ids=None):
    """COCOeval (bbox) of result dicts.

    Returns (dict of the six numbers, summary text); a number is None where the images
    hold no ground-truth object to measure it on (COCOeval's -1).
    """
    image_ids = sorted(coco_gt.imgs if image_ids is None else image_ids)
    if not image_ids:
        raise ValueError("no images to evaluate: the split is empty")
    if not results:               # COCOeval cannot load no results: AP 0 where measured
        anns = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_ids))
                if not a.get("iscrowd")]
        stats = {k: 0.0 if anns else None for k in METRICS}
        for k, (lo, hi) in AREAS.items():
            stats[k] = 0.0 if any(lo <= a["area"] < hi for a in anns) else None
        return stats, "no detections"
    with contextlib.redirect_stdout(io.StringIO()) as text:
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: float(v) if v >= 0 else None for k, v in zip(METRICS, ev.stats[:6])}
    return stats, text.getvalue()


def check_categories(coco_gt, num_classes):
    """Raise a ValueError when the ground truth uses category ids that a model with
    num_classes logits cannot predict (it would score 0 AP on them, unmeasured)."""
    used = {a["category_id"] for a in coco_gt.anns.values()}
    unknown = sorted(c for c in used if not 0 <= c < num_classes)
    if unknown:
        raise ValueError(f"the ground truth has category ids {unknown[:10]} that the model "
                         f"does not know (num_classes={num_classes}: ids 0.."
                         f"{num_classes - 1}); evaluate it on data of its own classes")


@torch.no_grad()
def evaluate(model, postprocessor, loader, coco_gt, device, progress=True, amp=False):
    """Predict every image of loader and score the detections with COCOeval.

    Args:
        model, postprocessor: as ``ddetr.models.build_model`` returns them.
        loader: DataLoader of (images, masks, targets) (``ddetr.data.collate``).
        coco_gt: the pycocotools COCO object of the split (``dataset.coco``).
        device: torch.device.
    Returns:
        dict with AP, AP50, AP75, APs, APm, APl (floats in [0, 1]) and "summary", the
        text that COCOeval prints. The same on every process.
    """
    if len(loader.dataset) == 0:
        raise ValueError("no images to evaluate: the split is empty")
    if hasattr(model, "num_classes"):
        check_categories(coco_gt, model.num_classes)
    model.eval()
    results, image_ids = [], []
    bar = tqdm(loader, desc="eval", disable=not progress or not dist.is_main_process(),
               file=sys.stderr, mininterval=2, dynamic_ncols=False, ncols=90)
    for images, masks, targets in bar:
        images, masks = images.to(device, non_blocking=True), masks.to(device)
        with autocast(device, amp):
            outputs = model(images, masks)
        outputs = {k: v.float() for k, v in outputs.items() if torch.is_tensor(v)}
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        ids = [t["image_id"] for t in targets]
        results += to_coco_results(postprocessor(outputs, sizes), ids)
        image_ids += ids
    gathered = dist.all_gather_object((results, image_ids))
    out = None
    if dist.is_main_process():
        all_results = [r for part in gathered for r in part[0]]
        all_ids = {i for part in gathered for i in part[1]}
        stats, summary = coco_eval(coco_gt, all_results, all_ids)
        out = {**stats, "summary": summary}
    return dist.broadcast_object(out)


def format_table(stats):
    """The six numbers as a two-line text table ("n/a": nothing to measure it on)."""
    head = " ".join(f"{k:>6}" for k in METRICS)
    vals = " ".join(f"{'n/a':>6}" if stats[k] is None else f"{stats[k]:6.3f}"
                    for k in METRICS)
    return f"{head}\n{vals}"
