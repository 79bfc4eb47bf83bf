"""The Hungarian matcher: which query predicts which ground-truth object.

DETR predicts a *set*: Lq boxes for an image with T objects (T <= Lq), in no order.
To compute a loss, every object is paired with one query, the pairing of least total
cost, found by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) on
the (Lq, T) cost matrix of each image:

    cost = w_class * focal cost of predicting the object's class
         + w_bbox  * L1 distance of the (cx, cy, w, h) boxes
         + w_giou  * (- generalised IoU of the boxes)

The class cost is the focal loss of labelling the query positive for that class minus
the focal loss of labelling it negative: the loss change if this query took the object.
Queries left unmatched are trained to predict "no object" (all sigmoids low).
"""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou


def focal_class_cost(prob, labels, alpha=0.25, gamma=2.0):
    """prob (P, num_classes) sigmoid scores, labels (T,) -> cost (P, T)."""
    prob = prob[:, labels]
    neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """Args: cost_class, cost_bbox, cost_giou (the w above); focal_alpha, focal_gamma."""

    def __init__(self, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25,
                 focal_gamma=2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def cost_matrix(self, outputs, targets):
        """The (N * Lq, sum T) cost of every query of the batch against every object."""
        logits, boxes = outputs["pred_logits"].flatten(0, 1), outputs["pred_boxes"].flatten(0, 1)
        labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)
        cost_class = focal_class_cost(logits.float().sigmoid(), labels, self.focal_alpha,
                                      self.focal_gamma)
        cost_bbox = torch.cdist(boxes.float(), tgt_boxes.float(), p=1)
        cost_giou = -generalized_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy"),
                                         box_convert(tgt_boxes.float(), "cxcywh", "xyxy"))
        return (self.cost_class * cost_class + self.cost_bbox * cost_bbox
                + self.cost_giou * cost_giou)

    @torch.no_grad()
    def forward(self, outputs, targets):
        """
        Args:
            outputs: "pred_logits" (N, Lq, num_classes), "pred_boxes" (N, Lq, 4).
            targets: N dicts with "labels" (T_i,) int64 and "boxes" (T_i, 4) cxcywh.

        Returns:
            N pairs (query_index, target_index) of int64 CPU tensors of length
            min(Lq, T_i): query query_index[j] predicts object target_index[j].
        """
        return self.match_all([(outputs, targets)])[0]

    @torch.no_grad()
    def match_all(self, pairs):
        """forward for several (outputs, targets) pairs at once (the decoder's layers and
        the proposals): the assignment runs on the CPU, and the cost matrices of all
        pairs cross to it in one copy (one wait for the GPU instead of one per pair).
        Returns a list of forward's results."""
        costs, layouts = [], []
        for outputs, targets in pairs:
            N, Lq = outputs["pred_logits"].shape[:2]
            if len(targets) != N:
                raise ValueError(f"{N} predictions but {len(targets)} targets")
            sizes = [len(t["boxes"]) for t in targets]
            cost = (self.cost_matrix(outputs, targets) if sum(sizes) else
                    outputs["pred_logits"].new_zeros(0, dtype=torch.float32))
            costs.append(cost.flatten())
            layouts.append((N, Lq, sizes))
        flat = torch.cat(costs).cpu()
        parts = flat.split([c.numel() for c in costs])
        return [self.assign(c.view(N, Lq, -1), sizes)
                for (N, Lq, sizes), c in zip(layouts, parts)]

    @staticmethod
    def assign(C, sizes):
        """C (N, Lq, sum T) CPU costs, sizes [T_i] -> N (query_index, target_index)."""
        empty = torch.empty(0, dtype=torch.int64)
        indices = []
        for i, c in enumerate(C.split(sizes, -1)):
            if sizes[i] == 0:
                indices.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(c[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64),
                            torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(cfg):
    return HungarianMatcher(cost_class=cfg.set_cost_class, cost_bbox=cfg.set_cost_bbox,
                            cost_giou=cfg.set_cost_giou, focal_alpha=cfg.focal_alpha)
