"""COCO evaluation with pycocotools: AP, AP50, AP75, APs, APm, APl.

Every process predicts its share of the validation images; the detections are gathered
on rank 0, which runs COCOeval, and the numbers are sent back to every process.
"""
import contextlib
import io
import sys

import torch
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

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


def coco_eval(coco_gt, results, image_ids=None):
    """COCOeval (bbox) of result dicts. Returns (dict of the six numbers, summary text)."""
    if not results:
        return {k: 0.0 for k in METRICS}, "no detections"
    with contextlib.redirect_stdout(io.StringIO()) as text:
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = {k: max(float(v), 0.0) for k, v in zip(METRICS, ev.stats[:6])}
    return stats, text.getvalue()


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
    """The six numbers as a two-line text table."""
    head = " ".join(f"{k:>6}" for k in METRICS)
    vals = " ".join(f"{stats[k]:6.3f}" for k in METRICS)
    return f"{head}\n{vals}"
