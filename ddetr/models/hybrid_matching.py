"""Hybrid matching: H-DETR's one-to-many branch (Jia et al., CVPR 2023, Sec. 3.2).

One-to-one matching gives each object a single positive query, so a DETR-like detector
sees few positives per image and learns slowly. H-DETR adds, in training only, a second
set of queries that is matched one-to-many: the ground truth repeated K times, so every
object gets K positive queries from this set, with the same Hungarian matcher and the
same losses. The two sets share every weight but do not see each other in the
decoder's self-attention; at inference only the one-to-one set runs, so the model is
Deformable DETR with its usual set prediction and no NMS.

In the two-stage variant the extra queries are simply more of the encoder's top-scoring
proposals: the top Lq + L_extra are kept, the first Lq form the one-to-one set and the
rest the one-to-many set.
"""
import torch


def hybrid_attn_mask(mask, num_dn, num_queries, num_extra, device=None):
    """The decoder's self-attention mask with the one-to-many set hidden from the rest.

    Queries are laid out [denoising (num_dn) | one-to-one (num_queries) | one-to-many
    (num_extra)]. mask: None, or the denoising mask over all of them (True = blocked).
    Returns (num_dn + num_queries + num_extra)^2 bool: the one-to-one and the
    one-to-many sets see only themselves (and the one-to-one set none of the denoising
    queries); denoising queries see their group and the one-to-one set."""
    total = num_dn + num_queries + num_extra
    if mask is None:
        mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    else:
        mask = mask.clone()
    one, many = num_dn, num_dn + num_queries
    mask[one:many, many:] = True         # one-to-one queries: not the one-to-many set
    mask[many:, :many] = True            # one-to-many queries: only themselves
    mask[:one, many:] = True             # denoising queries: not the one-to-many set
    return mask


def repeat_targets(targets, k):
    """Every image's objects repeated k times (labels (k*T,), boxes (k*T, 4))."""
    return [dict(t, labels=t["labels"].repeat(k), boxes=t["boxes"].repeat(k, 1))
            for t in targets]
