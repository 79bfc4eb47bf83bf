"""Denoising queries: DN-DETR's training shortcut (Li et al., CVPR 2022, Sec. 3.2-3.4).

Why DETR-like detectors learn slowly, in DN-DETR's reading: the Hungarian matching of
a query to an object changes from one step to the next early in training, so a query's
target keeps moving. Denoising adds a task whose target never moves. During training
the decoder gets, besides its Lq matching queries, G groups of *noised ground truth*:

  * content: the embedding of the object's label, replaced by a random class with
    probability ``label_noise`` (Sec. 3.4, "label flipping");
  * reference box: the object's box with its centre moved by up to
    ``box_noise`` * (w/2, h/2) and its width and height scaled by a factor in
    [1 - box_noise, 1 + box_noise] (Sec. 3.3, "center shifting" and "box scaling").

Each such query is trained to reconstruct its own object: no matching, the same
losses (focal, L1, GIoU) at every decoder layer. An attention mask (Sec. 3.4) keeps the
task honest: the matching queries never see the denoising ones (they would read the
answer off them), and a group never sees another group (which holds the same objects
with other noise); a denoising query may look at the matching queries.

At inference nothing changes: without targets (or in eval mode) the decoder runs its
Lq queries alone, and the model is Deformable DETR. The denoising queries use the
decoder's reference-box machinery, so they need 4-d reference boxes: the two-stage
variant (a box per proposal) or DAB anchors, as in DN-DETR, which builds on DAB-DETR.

Queries are laid out denoising part first: group g holds queries g*T .. g*T + T - 1,
where T is the largest object count in the batch (images with fewer objects pad their
groups; padded queries get a zero content vector and no loss).
"""
from dataclasses import dataclass

import torch


@dataclass
class DenoisingQueries:
    """The denoising part of a decoder batch.

    tgt (N, G*T, C) contents; boxes (N, G*T, 4) noised reference boxes (cx, cy, w, h)
    in [0, 1]; attn_mask (G*T + Lq, G*T + Lq) bool, True where query row may not
    attend to query column; indices: N pairs (query index, target index), int64 on
    the CPU like the matcher's, the object each denoising query reconstructs;
    groups G."""
    tgt: torch.Tensor
    boxes: torch.Tensor
    attn_mask: torch.Tensor
    indices: list
    groups: int

    @property
    def num_queries(self):
        return self.tgt.shape[1]


def noise_boxes(boxes, box_noise):
    """boxes (..., 4) (cx, cy, w, h) in [0, 1] -> the same boxes with the centre moved
    by up to box_noise * (w/2, h/2) and the size scaled by [1 - box_noise, 1 + box_noise],
    uniformly, clamped to [0, 1]."""
    u = torch.rand_like(boxes) * 2 - 1
    wh = boxes[..., 2:]
    centre = boxes[..., :2] + u[..., :2] * wh / 2 * box_noise
    size = wh * (1 + u[..., 2:] * box_noise)
    return torch.cat([centre, size], -1).clamp(0.0, 1.0)


def noise_labels(labels, num_classes, label_noise):
    """labels (...,) int64 -> each replaced by a random class with probability
    label_noise."""
    flip = torch.rand(labels.shape, device=labels.device) < label_noise
    random = torch.randint_like(labels, num_classes)
    return torch.where(flip, random, labels)


def denoising_attn_mask(T, groups, num_queries, device=None):
    """(G*T + Lq, G*T + Lq) bool, True = blocked: matching queries (the last Lq) see no
    denoising query; denoising group g sees itself and the matching queries only."""
    dn = T * groups
    mask = torch.zeros(dn + num_queries, dn + num_queries, dtype=torch.bool, device=device)
    mask[dn:, :dn] = True
    for g in range(groups):
        mask[g * T:(g + 1) * T, :g * T] = True
        mask[g * T:(g + 1) * T, (g + 1) * T:dn] = True
    return mask


def make_denoising_queries(targets, label_embed, num_queries, groups, label_noise,
                           box_noise):
    """G groups of noised copies of the batch's objects (see the module docstring).

    Args:
        targets: N dicts with "labels" (T_i,) int64 and "boxes" (T_i, 4) (cx, cy, w, h)
            in [0, 1], on the model's device.
        label_embed: nn.Embedding(num_classes, C), the label -> content table.
        num_queries: Lq, the matching queries that follow the denoising part.
        groups: G >= 1. label_noise, box_noise: in [0, 1].

    Returns:
        DenoisingQueries, or None when the batch holds no object.
    """
    T = max(len(t["labels"]) for t in targets)
    if T == 0:
        return None
    weight = label_embed.weight
    N = len(targets)
    labels = weight.new_zeros((N, T), dtype=torch.int64)
    boxes = weight.new_zeros((N, T, 4))
    valid = weight.new_zeros((N, T), dtype=torch.bool)
    for i, t in enumerate(targets):
        n = len(t["labels"])
        labels[i, :n], boxes[i, :n], valid[i, :n] = t["labels"], t["boxes"], True
    labels, boxes, valid = (x.repeat(1, groups, *([1] * (x.dim() - 2)))
                            for x in (labels, boxes, valid))
    labels = noise_labels(labels, label_embed.num_embeddings, label_noise)
    tgt = label_embed(labels) * valid[..., None].to(weight.dtype)
    boxes = noise_boxes(boxes, box_noise)
    indices = []
    for t in targets:
        n = len(t["labels"])
        query = (torch.arange(groups)[:, None] * T + torch.arange(n)).flatten()
        indices.append((query, torch.arange(n).repeat(groups)))
    mask = denoising_attn_mask(T, groups, num_queries, weight.device)
    return DenoisingQueries(tgt, boxes, mask, indices, groups)


def split_denoising(x, dn):
    """(..., G*T + Lq, k) -> the denoising part (..., G*T, k) and the matching part
    (..., Lq, k) along the query dimension (-2)."""
    return x[..., :dn.num_queries, :], x[..., dn.num_queries:, :]
