"""The set loss of (Deformable) DETR.

For every output (the last decoder layer, each earlier layer when aux_loss, and the
encoder proposals when two-stage):

1. match queries to objects with the Hungarian matcher (its own matching per output);
2. classification: sigmoid focal loss over all Lq x num_classes scores; the target is
   1 for the matched query's object class and 0 everywhere else (unmatched queries
   learn "no object" by being 0 for every class); with ``rt_detr_vfl`` the varifocal
   loss, whose target there is the matched box's IoU (``iou_aware``);
3. boxes, matched pairs only: L1 on (cx, cy, w, h) and 1 - generalised IoU.

Every loss is a sum divided by the number of objects in the batch (averaged across
processes when torch.distributed is initialised, so each GPU's loss has the same
scale), not by the number of queries. The encoder proposals are trained class-agnostic:
every object counts as class 0 ("foreground").

The criterion returns the *unweighted* losses, named loss_ce, loss_bbox, loss_giou for
the last layer, with suffix _0 .. _{n-2} for the earlier decoder layers, _enc for the
proposals, _dn, _dn_0 .. for DN-DETR's denoising queries and _o2m, _o2m_0 .. for
H-DETR's one-to-many queries when the model made them (``denoising_losses``,
``one_to_many_losses``); ``weight_dict`` holds their weights (2, 5, 2 in the paper). It also reports
``class_error`` and ``cardinality_error`` for logging; they have no weight.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from .hybrid_matching import repeat_targets
from .iou_aware import matched_iou, varifocal_loss
from .matcher import build_matcher


def num_boxes_across_processes(targets, device):
    """The number of objects per process, averaged over processes, at least 1: a 0-dim
    float32 tensor on `device` (a tensor, so that the losses divide by it without
    waiting for the GPU)."""
    num = torch.full((), float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(num)
        num = num / dist.get_world_size()
    return num.clamp(min=1)


def indices_on(indices_lists, device):
    """The matcher's CPU (query, target) index pairs, for several outputs, on `device`:
    one copy for all of them (from pinned memory, not waiting for the GPU). Indexing a
    GPU tensor with CPU indices would copy (and wait) once per index tensor."""
    flat = [t for indices in indices_lists for pair in indices for t in pair]
    if torch.device(device).type != "cuda" or not flat:
        return indices_lists
    joined = torch.cat(flat).pin_memory().to(device, non_blocking=True)
    parts = iter(joined.split([len(t) for t in flat]))
    return [[(next(parts), next(parts)) for _ in indices] for indices in indices_lists]


class SetCriterion(nn.Module):
    """Args:
        num_classes: logits per query.
        matcher: a HungarianMatcher.
        weight_dict: loss name -> weight (used by the engine, not here).
        focal_alpha, focal_gamma: of the classification loss.
        one_to_many_k: how often H-DETR's one-to-many queries see each object.
        iou_aware: classify with RT-DETR's varifocal loss towards the matched box's IoU
            (ddetr.models.iou_aware) instead of the focal loss towards 1.
    """

    def __init__(self, num_classes, matcher, weight_dict, focal_alpha=0.25, focal_gamma=2.0,
                 one_to_many_k=6, iou_aware=False):
        super().__init__()
        self.iou_aware = iou_aware
        self.one_to_many_k = one_to_many_k
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @staticmethod
    def matched_queries(indices):
        """(batch index, query index) of every matched pair, each (P,) int64."""
        batch = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)])
        query = torch.cat([q for q, _ in indices])
        return batch, query

    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        logits = outputs["pred_logits"]  # (N, Lq, num_classes)
        batch, query = self.matched_queries(indices)
        labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        labels = labels.to(logits.device)
        if self.iou_aware:  # RT-DETR's IoU-aware classification (ddetr.models.iou_aware)
            target = torch.zeros(logits.shape, device=logits.device)
            target[batch, query, labels] = matched_iou(*self.matched_boxes(
                outputs, targets, indices))
            loss = varifocal_loss(logits, target)
        else:
            onehot = torch.zeros_like(logits)
            onehot[batch, query, labels] = onehot.new_ones(())  # a Python 1 would be copied
            loss = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha,
                                      gamma=self.focal_gamma, reduction="sum")
        losses = {"loss_ce": loss / num_boxes}
        if log:
            with torch.no_grad():
                if len(labels):
                    correct = logits[batch, query].argmax(-1) == labels
                    losses["class_error"] = 100 - 100 * correct.float().mean()
                else:
                    losses["class_error"] = logits.new_zeros(())
        return losses

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """|number of confident (> 0.5) queries - number of objects|, averaged: a log."""
        logits = outputs["pred_logits"]
        predicted = (logits.sigmoid().max(-1)[0] > 0.5).sum(1).float()
        lengths = torch.stack([torch.full((), float(len(t["labels"])), device=logits.device)
                               for t in targets])  # filled there: no copy from the host
        return {"cardinality_error": F.l1_loss(predicted, lengths)}

    def matched_boxes(self, outputs, targets, indices):
        """(predicted, target) boxes of the matched pairs, each (P, 4) cxcywh."""
        batch, query = self.matched_queries(indices)
        src = outputs["pred_boxes"][batch, query]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        return src, tgt

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        src, tgt = self.matched_boxes(outputs, targets, indices)  # (P, 4) each
        loss_bbox = F.l1_loss(src, tgt, reduction="sum")
        giou = torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"),
                                              box_convert(tgt, "cxcywh", "xyxy")))
        return {"loss_bbox": loss_bbox / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes}

    def losses_of(self, outputs, targets, indices, num_boxes, suffix="", log=False):
        """The losses of one output given its matching (on the outputs' device)."""
        losses = {}
        losses.update(self.loss_labels(outputs, targets, indices, num_boxes, log=log))
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        if log:
            losses.update(self.loss_cardinality(outputs, targets, indices, num_boxes))
        return {k + suffix: v for k, v in losses.items()}

    def forward(self, outputs, targets):
        """
        Args:
            outputs: the model's dict ("pred_logits", "pred_boxes", optionally
                "aux_outputs" and "enc_outputs").
            targets: N dicts with "labels" (T_i,) int64 in [0, num_classes) and "boxes"
                (T_i, 4) (cx, cy, w, h) in [0, 1] of the unpadded image.

        Returns:
            dict of scalar tensors: the unweighted losses (and two logged errors).
        """
        self.check_targets(targets)
        device = outputs["pred_logits"].device
        num_boxes = num_boxes_across_processes(targets, device)
        # every output's matching, solved together (one wait for the GPU)
        pairs = [(outputs, targets, "", True)]
        pairs += [(aux, targets, f"_{i}", False)
                  for i, aux in enumerate(outputs.get("aux_outputs", []))]
        if "enc_outputs" in outputs:
            binary = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            pairs.append((outputs["enc_outputs"], binary, "_enc", False))
        matchings = self.matcher.match_all([(out, tgt) for out, tgt, _, _ in pairs])
        losses = {}
        for (out, tgt, suffix, log), indices in zip(pairs, indices_on(matchings, device)):
            losses.update(self.losses_of(out, tgt, indices, num_boxes, suffix, log))
        if "one_to_many_outputs" in outputs:
            losses.update(self.one_to_many_losses(outputs["one_to_many_outputs"], targets,
                                                  num_boxes))
        if "dn_outputs" in outputs:
            losses.update(self.denoising_losses(outputs["dn_outputs"], outputs["dn_meta"],
                                                targets, num_boxes))
        return losses

    def one_to_many_losses(self, outputs, targets, num_boxes):
        """H-DETR (ddetr.models.hybrid_matching): the one-to-many queries matched by the
        same matcher to every object repeated one_to_many_k times, at every decoder
        layer, normalised by the repeated count. Suffixes _o2m and _o2m_0 .. _o2m_{n-2}."""
        k = self.one_to_many_k
        repeated = repeat_targets(targets, k)
        outs = [(outputs, "_o2m")]
        outs += [(aux, f"_o2m_{i}") for i, aux in enumerate(outputs.get("aux_outputs", []))]
        matchings = self.matcher.match_all([(out, repeated) for out, _ in outs])
        device = outputs["pred_logits"].device
        losses = {}
        for (out, suffix), indices in zip(outs, indices_on(matchings, device)):
            losses.update(self.losses_of(out, repeated, indices, num_boxes * k, suffix))
        return losses

    def denoising_losses(self, dn_outputs, dn, targets, num_boxes):
        """DN-DETR (ddetr.models.denoising): every denoising query is trained to
        reconstruct the object it was made from, no matching, at every decoder layer;
        each group counts as one more set of the batch's objects. Suffixes _dn and
        _dn_0 .. _dn_{n-2}."""
        indices = indices_on([dn.indices], dn_outputs["pred_logits"].device)[0]
        outs = [(dn_outputs, "_dn")]
        outs += [(aux, f"_dn_{i}") for i, aux in enumerate(dn_outputs.get("aux_outputs", []))]
        losses = {}
        for out, suffix in outs:
            losses.update(self.losses_of(out, targets, indices, num_boxes * dn.groups,
                                         suffix))
        return losses

    def check_targets(self, targets):
        """Labels in [0, num_classes) (read in one copy) and boxes (T, 4)."""
        for t in targets:
            if t["boxes"].shape != (len(t["labels"]), 4):
                raise ValueError(f"boxes must be (T, 4) = ({len(t['labels'])}, 4), got "
                                 f"{tuple(t['boxes'].shape)}")
        labels = torch.cat([t["labels"].reshape(-1) for t in targets])
        if len(labels):
            low, high = torch.stack(labels.aminmax()).tolist()
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}), got "
                                 f"{low}..{high}")


def build_weight_dict(cfg):
    """loss name -> weight, for the last layer, the aux layers and the proposals."""
    base = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef,
            "loss_giou": cfg.giou_loss_coef}
    weights = dict(base)
    if cfg.aux_loss:
        for i in range(cfg.dec_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in base.items()})
    if cfg.two_stage and cfg.architecture != "detr":
        weights.update({f"{k}_enc": v for k, v in base.items()})
    for on, name in ((cfg.dn_detr, "_dn"), (cfg.h_detr, "_o2m")):
        if on:
            suffixes = [name] + ([f"{name}_{i}" for i in range(cfg.dec_layers - 1)]
                                 if cfg.aux_loss else [])
            weights.update({k + s: v for s in suffixes for k, v in base.items()})
    return weights


def build_criterion(cfg):
    return SetCriterion(cfg.num_classes, build_matcher(cfg), build_weight_dict(cfg),
                        focal_alpha=cfg.focal_alpha, one_to_many_k=cfg.h_detr_k,
                        iou_aware=cfg.rt_detr_vfl)
