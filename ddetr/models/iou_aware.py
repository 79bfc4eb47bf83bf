"""IoU-aware classification: a matched query's class score learns its box's IoU.

Deformable DETR's focal loss (``criterion.SetCriterion.loss_labels``) trains every
matched query's score towards 1, however well its box fits the object, so the scores
that rank the detections do not know which boxes are good. The varifocal loss
(VarifocalNet, Zhang et al., CVPR 2021, Sec. 3.2, Eq. 2) trains that score towards the
IoU of the query's box with its object instead; RT-DETR (Lv et al., "DETRs Beat YOLOs
on Real-time Object Detection", arXiv 2304.08069v2, Sec. 4.3, "IoU-aware query
selection"; CVPR 2024) trains the encoder proposals and the decoder queries of a two-stage DETR
with it, so that the proposals chosen by score are the ones that fit well. Switch:
``rt_detr_vfl``. It changes the loss only; the model and its inference are Deformable
DETR's.

With p = sigmoid(logit) and q the target (the IoU at the matched object's class, 0 at
every other score):

    VFL(p, q) = -q (q log p + (1 - q) log(1 - p))      if q > 0
                -alpha p^gamma log(1 - p)                if q = 0

Positives are weighted by their own IoU (a well-fitting box matters more); negatives
keep the focal loss's down-weighting of easy ones (alpha p^gamma).
"""
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, box_iou


def matched_iou(src, tgt):
    """IoU of each matched pair: src, tgt (P, 4) boxes (cx, cy, w, h) -> (P,) float32,
    no gradient (a target, not a prediction)."""
    with torch.no_grad():
        src, tgt = (box_convert(b.float(), "cxcywh", "xyxy") for b in (src, tgt))
        return torch.diag(box_iou(src, tgt)) if len(src) else src.new_zeros(0)


def varifocal_loss(logits, target, alpha=0.75, gamma=2.0):
    """The summed varifocal loss of every score.

    Args:
        logits: (N, Lq, C) class logits.
        target: (N, Lq, C) in [0, 1]: a matched query's IoU at its object's class, 0
            everywhere else.
        alpha, gamma: the negatives' weight alpha p^gamma (VarifocalNet's 0.75 and 2).

    Returns:
        a 0-dim tensor (at least float32: bfloat16 logits are promoted).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits, target = logits.to(dtype), target.to(dtype)
    positive = target > 0
    weight = torch.where(positive, target, alpha * logits.sigmoid().pow(gamma))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (weight * bce).sum()  # (BCE's own weight argument takes no gradient)
