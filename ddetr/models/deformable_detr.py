"""Deformable DETR: backbone -> input projections -> deformable transformer -> heads.

    images (N, 3, H, W), masks (N, H, W)
      -> backbone: C3, C4, C5 (or C5 only), their masks and sine position codes
      -> input_proj: each to d_model (1x1 conv + GroupNorm); with 4 levels an extra C6
         (3x3 stride-2 conv + GroupNorm on C5), with its own mask and position code
      -> transformer: hs (layers, N, Lq, C) and the reference point of every layer
      -> class_embed: logits (N, Lq, num_classes), one sigmoid per class (focal loss)
         bbox_embed:  a 3-layer MLP predicting the box in inverse-sigmoid space as an
                      offset from the reference point: box = sigmoid(mlp(h) + logit(ref))

The variants are switches of one class:
  * single scale: num_feature_levels = 1 (C5 only);
  * with_box_refine: one head per decoder layer (not shared), and the decoder refines
    its reference boxes with them after every layer;
  * two_stage: the encoder's tokens are scored as proposals by one more pair of heads
    (index dec_layers), and the top-k proposals become the decoder's queries and
    reference boxes.
  * dn_groups > 0 (not in the paper; training only): DN-DETR's denoising queries,
    G groups of noised ground-truth boxes and labels that the decoder learns to
    reconstruct (``ddetr.models.denoising``); needs two-stage or DAB anchors.
  * query_anchors="dab" (not in the paper; the book's "what came next" chapter): as in
    DAB-DETR, each query is a learned content vector plus a learned anchor box
    ``refpoint_embed`` (cx, cy, w, h); the decoder's reference boxes start at the
    anchors, the positional query is made from the current box at every layer, and the
    boxes are refined layer by layer (needs with_box_refine).

Outputs, for the criterion and the postprocessor:
    "pred_logits" (N, Lq, num_classes), "pred_boxes" (N, Lq, 4) (cx, cy, w, h) in [0, 1]
    of the unpadded image, "aux_outputs" (one dict per earlier decoder layer) when
    aux_loss, "enc_outputs" (the encoder proposals) when two_stage; in training with
    denoising, "dn_outputs" (the same keys for the denoising queries) and "dn_meta"
    (their DenoisingQueries: which object each reconstructs).

The heads belong to the model, which passes them to the transformer at every call
(``box_heads`` to refine, ``proposal_heads`` for two-stage); the transformer never
reaches back. Parameter names follow the official release: as there, with refinement
or two-stage the decoder lists the same head modules under its own name
(``transformer.decoder.bbox_embed`` and, two-stage, ``transformer.decoder.class_embed``),
so they appear twice in state_dict() (and once in parameters()).
"""
import math

import torch
from torch import nn

from ..nn.deformable_transformer import build_deformable_transformer
from ..nn.geometry import decode_boxes, inverse_sigmoid
from ..nn.helpers import get_clones
from .backbone import build_backbone, resize_mask
from .denoising import make_denoising_queries, split_denoising
from .hybrid_matching import hybrid_attn_mask
from .detr import MLP, check_inputs


INPUT_PROJ_GROUPS = 32   # the GroupNorm groups of every input projection


def input_projections(backbone_channels, C, num_feature_levels):
    """Per level, a map of the backbone (channels listed, finest first) -> width C:
    a 1x1 conv + GroupNorm for each backbone map, then 3x3 stride-2 conv + GroupNorm
    for every extra level (the first on the last backbone map); with one level, C5's
    projection only."""
    def proj(ch, **conv):
        return nn.Sequential(nn.Conv2d(ch, C, **conv), nn.GroupNorm(INPUT_PROJ_GROUPS, C))
    if num_feature_levels == 1:
        return [proj(backbone_channels[0], kernel_size=1)]
    projs = [proj(ch, kernel_size=1) for ch in backbone_channels]
    in_channels = backbone_channels[-1]
    for _ in range(num_feature_levels - len(backbone_channels)):
        projs.append(proj(in_channels, kernel_size=3, stride=2, padding=1))
        in_channels = C
    return projs


class DeformableDETR(nn.Module):
    """Args:
        backbone: a Joiner (backbone.0 = ResNet, backbone.1 = position encoding).
        transformer: a DeformableTransformer.
        num_classes: logits per query (COCO: 91, ids 1..90 with 0 unused).
        num_queries: Lq (in the two-stage variant, the number of proposals kept).
        num_feature_levels: L = 1 (C5) or more (C3, C4, C5 and extra stride-2 convs).
        aux_loss: also return the prediction of every earlier decoder layer.
        with_box_refine, two_stage: the paper's two improvements.
        query_anchors: "none", or "dab" for learned anchor-box queries (the transformer
            must be built with the same value).
        denoising: None, or (groups, label_noise, box_noise) of DN-DETR's denoising
            queries in training (``ddetr.models.denoising``; adds ``label_enc``).
        look_forward_twice: DINO's gradient path through refinement (see
            ``DeformableTransformerDecoder``); needs with_box_refine.
        one_to_many: H-DETR's one-to-many queries in training, this many more
            proposals (``ddetr.models.hybrid_matching``); two-stage only; 0: off.
    """

    def __init__(self, backbone, transformer, num_classes, num_queries, num_feature_levels,
                 aux_loss=True, with_box_refine=False, two_stage=False, query_anchors="none",
                 denoising=None, look_forward_twice=False, one_to_many=0):
        super().__init__()
        self.one_to_many = one_to_many
        transformer.decoder.look_forward_twice = look_forward_twice
        if query_anchors != getattr(transformer, "query_anchors", "none"):
            raise ValueError(f"query_anchors={query_anchors!r}, but the transformer was "
                             f"built with {getattr(transformer, 'query_anchors', 'none')!r}")
        if 1 < num_feature_levels < len(backbone.num_channels):
            raise ValueError(f"num_feature_levels must be 1 (C5) or at least "
                             f"{len(backbone.num_channels)} (the backbone gives "
                             f"{len(backbone.num_channels)} maps), got {num_feature_levels}")
        self.query_anchors, self.denoising = query_anchors, denoising
        self.num_queries, self.num_classes = num_queries, num_classes
        self.num_feature_levels, self.aux_loss = num_feature_levels, aux_loss
        self.with_box_refine, self.two_stage = with_box_refine, two_stage
        self.transformer, self.backbone = transformer, backbone
        C = transformer.d_model
        if denoising is not None:   # the content of a denoising query: its label's
            self.label_enc = nn.Embedding(num_classes, C)
        class_embed, bbox_embed = nn.Linear(C, num_classes), MLP(C, C, 4, 3)
        self.make_queries(num_queries, C)
        self.input_proj = nn.ModuleList(input_projections(backbone.num_channels, C,
                                                          num_feature_levels))
        # initialisation: a prior probability of 0.01 for every class (focal loss), box
        # offsets start at zero, so the first boxes sit at the reference points
        prior_prob = 0.01
        nn.init.constant_(class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.make_heads(class_embed, bbox_embed)

    def make_queries(self, num_queries, C):
        """The learned queries of the one-stage variants (two-stage makes them from the
        proposals): with DAB anchors a content vector and an anchor box per query
        (inverse-sigmoid space; centres spread uniformly over the image, sizes 0.1), else
        a positional half (-> reference point) and a content half."""
        if self.query_anchors == "dab":
            self.query_embed = nn.Embedding(num_queries, C)
            self.refpoint_embed = nn.Embedding(num_queries, 4)
            with torch.no_grad():
                self.refpoint_embed.weight[:, :2].uniform_(0.05, 0.95)
                self.refpoint_embed.weight[:, 2:].fill_(0.1)
                self.refpoint_embed.weight.copy_(inverse_sigmoid(self.refpoint_embed.weight))
        elif not self.two_stage:
            self.query_embed = nn.Embedding(num_queries, C * 2)

    def make_heads(self, class_embed, bbox_embed):
        """One (class, box) head per decoder layer, +1 for the encoder proposals when
        two-stage: copies with refinement, else one shared pair. Also lists them under
        the decoder, for the official state-dict names only (the transformer uses only
        what forward passes it)."""
        decoder = self.transformer.decoder
        num_pred = decoder.num_layers + (1 if self.two_stage else 0)
        if self.with_box_refine:
            self.class_embed = get_clones(class_embed, num_pred)
            self.bbox_embed = get_clones(bbox_embed, num_pred)
            # initial box size sigmoid(-2) ~ 0.12 for the first layer's prediction
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)  # shared
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if self.query_anchors == "dab" or self.two_stage:
            for box_embed in self.bbox_embed:
                # reference boxes already carry a size: offsets start at zero
                nn.init.zeros_(box_embed.layers[-1].bias[2:])
        if self.with_box_refine:
            decoder.add_module("bbox_embed", self.bbox_embed)
        if self.two_stage:
            decoder.add_module("class_embed", self.class_embed)
            decoder.add_module("bbox_embed", self.bbox_embed)

    def features(self, images, masks):
        """The transformer's inputs: lists of L maps (N, C, H_l, W_l), masks (N, H_l, W_l)
        and position codes (N, C, H_l, W_l), finest first."""
        features, pos = self.backbone(images, masks)
        srcs, level_masks = [], []
        for lvl, (feature, mask) in enumerate(features):
            srcs.append(self.input_proj[lvl](feature))
            level_masks.append(mask)
        for lvl in range(len(srcs), self.num_feature_levels):
            # extra levels: from the last backbone map, then from the previous level
            src = self.input_proj[lvl](features[-1][0] if lvl == len(features) else srcs[-1])
            mask = resize_mask(masks, src.shape[-2:])
            srcs.append(src)
            level_masks.append(mask)
            pos.append(self.backbone[1](mask).to(src.dtype))
        return srcs, level_masks, pos

    def forward(self, images, masks, targets=None):
        """images (N, 3, H, W) normalised, masks (N, H, W) bool (True = padding) -> dict
        (see the module docstring). targets (N dicts of "labels", "boxes") are read only
        in training with denoising queries."""
        check_inputs(images, masks)
        srcs, level_masks, pos = self.features(images, masks)
        lq, extra = self.num_queries, self.one_to_many if self.training else 0
        if self.two_stage:          # the top-k keeps at most one proposal per token
            tokens = sum(src.shape[-2] * src.shape[-1] for src in srcs)
            lq, extra = min(lq, tokens), max(0, min(extra, tokens - lq))
        dn, attn_mask = None, None
        if self.training and self.denoising is not None and targets is not None:
            dn = make_denoising_queries(targets, self.label_enc, lq + extra, *self.denoising)
            attn_mask = None if dn is None else dn.attn_mask
        if extra:
            attn_mask = hybrid_attn_mask(attn_mask, 0 if dn is None else dn.num_queries,
                                         lq, extra, images.device)
        query_embed = None if self.two_stage else self.query_embed.weight
        anchors = self.refpoint_embed.weight if self.query_anchors == "dab" else None
        box_heads = self.bbox_embed if self.with_box_refine else None
        # two-stage: the heads after the decoder's (index dec_layers) score the proposals
        proposal_heads = (self.class_embed[-1], self.bbox_embed[-1]) if self.two_stage else None
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, level_masks, pos, query_embed, anchors, box_heads, proposal_heads, dn,
            extra, attn_mask)
        logits, boxes = self.heads(hs, init_reference, inter_references)
        if dn is not None:
            (dn_logits, logits), (dn_boxes, boxes) = (
                zip(*[split_denoising(x, dn) for x in xs]) for xs in (logits, boxes))
        out = self.set_outputs([x[:, :lq] for x in logits], [x[:, :lq] for x in boxes])
        if dn is not None:
            out["dn_outputs"], out["dn_meta"] = self.set_outputs(dn_logits, dn_boxes), dn
        if extra:
            out["one_to_many_outputs"] = self.set_outputs([x[:, lq:] for x in logits],
                                                          [x[:, lq:] for x in boxes])
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class,
                                  "pred_boxes": enc_coord_unact.sigmoid()}
        return out

    def heads(self, hs, init_reference, inter_references):
        """Every decoder layer's class logits and boxes (lists of (N, Lall, ...)),
        each box decoded relative to the reference the layer started from."""
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = init_reference if lvl == 0 else inter_references[lvl - 1]
            boxes.append(decode_boxes(self.bbox_embed[lvl](hs[lvl]), reference))
            logits.append(self.class_embed[lvl](hs[lvl]))
        return logits, boxes

    def set_outputs(self, logits, boxes):
        """Per-layer lists of logits and boxes -> the last layer's "pred_logits" and
        "pred_boxes", and "aux_outputs" for the earlier layers when aux_loss."""
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out


def build_deformable_detr(cfg):
    backbone = build_backbone(cfg)
    transformer = build_deformable_transformer(cfg)
    return DeformableDETR(backbone, transformer, num_classes=cfg.num_classes,
                          num_queries=cfg.num_queries,
                          num_feature_levels=cfg.num_feature_levels, aux_loss=cfg.aux_loss,
                          with_box_refine=cfg.with_box_refine, two_stage=cfg.two_stage,
                          query_anchors=cfg.query_anchors,
                          denoising=((cfg.dn_groups, cfg.dn_label_noise, cfg.dn_box_noise)
                                     if cfg.dn_detr else None),
                          look_forward_twice=cfg.dino_look_forward_twice,
                          one_to_many=cfg.h_detr_queries if cfg.h_detr else 0)
