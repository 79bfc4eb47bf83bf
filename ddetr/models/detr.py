"""DETR's own model: the backbone and DETR's transformer, boxes predicted absolutely.

(Chapter 7's baseline is another model: Deformable DETR with DETR's attention,
attention="dense" in ``ddetr.nn.deformable_transformer``, which differs from Deformable
DETR in the attention only. This one differs as DETR does: no reference points.)

    images (N, 3, H, W), masks (N, H, W)
      -> backbone: C5 (stride 32), its mask and sine position code
      -> input_proj: 1x1 conv to d_model
      -> transformer (dense): hs (layers, N, Lq, C)
      -> class_embed: logits (N, Lq, num_classes); bbox_embed: sigmoid(MLP(h)) as
         (cx, cy, w, h) in [0, 1] of the unpadded image

Differences from facebookresearch/detr, so that the book compares like with like: the
classifier is a sigmoid per class trained with focal loss (no "no object" logit), as in
Deformable DETR, so the same matcher, criterion and postprocessor serve both models;
the position code puts pixel centres at (i + 0.5) / H. Module names follow DETR's
(``input_proj``, ``query_embed``, ``transformer.encoder.layers.{i}.self_attn``,
``transformer.decoder.layers.{i}.multihead_attn``, ``class_embed``, ``bbox_embed``).

This file also holds the pieces both detectors share: ``MLP`` and the input checks.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.transformer import build_transformer
from .backbone import build_backbone


class MLP(nn.Module):
    """num_layers linear layers with ReLU between them: (..., in) -> (..., out)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in
                                    zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == self.num_layers - 1 else F.relu(layer(x))
        return x


def check_inputs(images, masks):
    """Raise ValueError unless images is (N, 3, H, W) float and masks (N, H, W) bool."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3 \
            or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor (N, 3, H, W), got "
                         f"{getattr(images, 'shape', type(images))} "
                         f"{getattr(images, 'dtype', '')}")
    if not torch.is_tensor(masks) or masks.dtype != torch.bool \
            or masks.shape != (images.shape[0],) + images.shape[2:]:
        raise ValueError(f"masks must be a bool tensor (N, H, W) = "
                         f"{(images.shape[0],) + tuple(images.shape[2:])}, got "
                         f"{getattr(masks, 'shape', type(masks))} "
                         f"{getattr(masks, 'dtype', '')}")


class DETR(nn.Module):
    """Args: backbone (a Joiner returning C5), transformer (dense), num_classes,
    num_queries Lq, aux_loss (return every decoder layer's prediction)."""

    def __init__(self, backbone, transformer, num_classes, num_queries, aux_loss=True):
        super().__init__()
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.aux_loss = aux_loss
        self.transformer = transformer
        C = transformer.d_model
        self.class_embed = nn.Linear(C, num_classes)
        self.bbox_embed = MLP(C, C, 4, 3)
        self.query_embed = nn.Embedding(num_queries, C)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], C, kernel_size=1)
        self.backbone = backbone
        prior_prob = 0.01  # focal loss prior, as in Deformable DETR
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, images, masks):
        """images (N, 3, H, W), masks (N, H, W) bool -> dict with "pred_logits"
        (N, Lq, num_classes), "pred_boxes" (N, Lq, 4) and, if aux_loss, "aux_outputs"."""
        check_inputs(images, masks)
        features, pos = self.backbone(images, masks)
        src, mask = features[-1]
        hs, _ = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos[-1])
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out


def build_detr(cfg):
    """DETR for cfg. The Deformable-only switches (num_feature_levels, with_box_refine,
    two_stage, enc/dec_n_points) do not apply and are ignored, so that any preset can be
    turned into its dense baseline with architecture="detr": it always uses C5 only."""
    backbone = build_backbone(cfg, return_interm_layers=False)
    return DETR(backbone, build_transformer(cfg), num_classes=cfg.num_classes,
                num_queries=cfg.num_queries, aux_loss=cfg.aux_loss)
