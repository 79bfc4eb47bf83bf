"""The Deformable DETR transformer: encoder, decoder and two-stage proposals.

Input: L feature maps of width C (already projected to d_model), their padding masks
and position codes. Everything is flattened into one sequence of S = sum H_l W_l
tokens, level after level; ``spatial_shapes`` (L, 2) and ``level_start_index`` (L,)
say where each level lies in it.

Encoder: every token is a query. Its reference point is its own pixel centre, and its
self-attention is MSDeformAttn over all L levels (K points per head and level), so a
layer costs O(S) instead of DETR's O(S^2).

Decoder: Lq object queries. Each layer does dense self-attention among the queries
(they are few), then MSDeformAttn cross-attention into the encoder output around the
query's reference point, then a feed-forward network. The reference point is a linear
layer + sigmoid of the query's positional embedding; with iterative box refinement the
model's box heads update it after every layer (``decoder.bbox_embed``); in the
two-stage variant the initial reference boxes are the top-scoring encoder proposals.

Coordinates. Reference points live in [0, 1] of the *valid* (unpadded) image, the frame
the boxes are predicted in. Each map of a padded batch has ``valid_ratios`` (N, L, 2) =
(valid W / W, valid H / H); multiplying by it gives the point in the padded map's
[0, 1] frame that the sampling operator uses. This is what makes the result of an image
independent of how much padding its batch added.

Parameter names (``level_embed``, ``encoder.layers.{i}.self_attn``, ``norm1``,
``linear1``, ``decoder.layers.{i}.cross_attn``, ``reference_points``, ``enc_output``,
``pos_trans``...) follow the official implementation.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.checks import level_tables
from .attention import MultiHeadAttention
from .ms_deform_attn import MSDeformAttn


def inverse_sigmoid(x, eps=1e-5):
    """log(x / (1 - x)), clamped so that 0 and 1 stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def get_clones(module, n):
    """n independent deep copies of module, in a ModuleList."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def with_pos(x, pos):
    return x if pos is None else x + pos


def box_sine_embed(boxes, num_pos_feats=128, temperature=10000):
    """boxes (N, Lq, 4) (cx, cy, w, h) in [0, 1] -> (N, Lq, 4 * num_pos_feats) sine codes,
    one block per coordinate (as DAB-DETR's positional queries)."""
    scale = 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = boxes[:, :, :, None] * scale / dim_t  # (N, Lq, 4, F)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4)
    return pos.flatten(2).to(boxes.dtype)


def valid_ratio(mask):
    """mask (N, H, W) bool (True = padding) -> (N, 2) float: (valid W / W, valid H / H)."""
    _, H, W = mask.shape
    valid_H = (~mask[:, :, 0]).sum(1)
    valid_W = (~mask[:, 0, :]).sum(1)
    return torch.stack([valid_W.float() / W, valid_H.float() / H], -1)


# --- encoder -------------------------------------------------------------------------

class DeformableTransformerEncoderLayer(nn.Module):
    """MSDeformAttn self-attention + FFN, post-norm. (N, S, C) -> (N, S, C)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8,
                 n_points=4, backend="auto"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index,
                padding_mask=None):
        """src, pos (N, S, C); reference_points (N, S, L, 2); padding_mask (N, S)."""
        attn = self.self_attn(with_pos(src, pos), reference_points, src, spatial_shapes,
                              level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers):
        super().__init__()
        self.layers = get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios):
        """The pixel centre of every token, seen from every level.

        Args:
            spatial_shapes: list of L (H_l, W_l). valid_ratios: (N, L, 2).

        Returns:
            (N, S, L, 2) points (x, y): token s's centre in [0, 1] of its valid image,
            times each level's valid ratio (i.e. in each padded map's frame).
        """
        device = valid_ratios.device
        points = []
        for lvl, (H, W) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, H - 0.5, H, dtype=torch.float32, device=device),
                torch.linspace(0.5, W - 0.5, W, dtype=torch.float32, device=device),
                indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * H)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * W)
            points.append(torch.stack((ref_x, ref_y), -1))  # (N, H*W, 2)
        points = torch.cat(points, 1)  # (N, S, 2) in the valid frame
        return points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos=None,
                padding_mask=None):
        """src (N, S, C), spatial_shapes (L, 2) int64, level_start_index (L,),
        valid_ratios (N, L, 2), pos (N, S, C), padding_mask (N, S) -> memory (N, S, C)."""
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        reference_points = self.get_reference_points(shapes, valid_ratios).to(src.dtype)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, level_start_index,
                        padding_mask)
        return out


# --- decoder -------------------------------------------------------------------------

class DeformableTransformerDecoderLayer(nn.Module):
    """Dense self-attention among queries, MSDeformAttn cross-attention, FFN; post-norm.

    (Official names: norm2 follows self-attention, norm1 cross-attention, norm3 the FFN.)
    """

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8,
                 n_points=4, backend="auto"):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes,
                level_start_index, padding_mask=None):
        """tgt, query_pos (N, Lq, C); reference_points (N, Lq, L, 2|4);
        src (N, S, C) the encoder memory; padding_mask (N, S) -> (N, Lq, C)."""
        q = k = with_pos(tgt, query_pos)
        attn, _ = self.self_attn(q, k, tgt)
        tgt = self.norm2(tgt + self.dropout2(attn))
        attn = self.cross_attn(with_pos(tgt, query_pos), reference_points, src,
                               spatial_shapes, level_start_index, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerDecoder(nn.Module):
    """A stack of decoder layers that returns every layer's output.

    The detector sets ``bbox_embed`` (a list of box heads, one per layer) and
    ``refine_boxes``: when True, the reference points are refined with them after each
    layer (iterative bounding box refinement). In the two-stage variant it also sets
    ``class_embed``; the heads at index num_layers score the encoder proposals.

    With DAB-style anchor queries the transformer sets ``ref_point_head`` (an MLP
    2C -> C): every layer then makes its positional query from the current reference
    box, ``query_pos = ref_point_head(box_sine_embed(box))``, so that the query's
    position follows the box as it is refined.
    """

    def __init__(self, decoder_layer, num_layers):
        super().__init__()
        self.layers = get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.bbox_embed = None
        self.class_embed = None
        self.refine_boxes = False
        self.ref_point_head = None

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index,
                valid_ratios, query_pos=None, padding_mask=None):
        """
        Args:
            tgt: (N, Lq, C) query contents. query_pos: (N, Lq, C) query positions.
            reference_points: (N, Lq, 2) points or (N, Lq, 4) boxes (cx, cy, w, h),
                in [0, 1] of the valid image.
            src: (N, S, C) memory. valid_ratios: (N, L, 2). padding_mask: (N, S).

        Returns:
            hs (num_layers, N, Lq, C), the output of each layer, and references
            (num_layers, N, Lq, 2|4), the reference points each layer's output is
            relative to for the *next* layer (detached, as in the paper).
        """
        out = tgt
        hs, references = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ratios = torch.cat([valid_ratios, valid_ratios], -1)  # (N, L, 4)
            else:
                ratios = valid_ratios
            reference_input = reference_points[:, :, None] * ratios[:, None]  # (N,Lq,L,.)
            if self.ref_point_head is not None:   # DAB: the position comes from the box
                query_pos = self.ref_point_head(
                    box_sine_embed(reference_points, out.shape[-1] // 2))
            out = layer(out, query_pos, reference_input, src, spatial_shapes,
                        level_start_index, padding_mask)
            if self.refine_boxes:
                delta = self.bbox_embed[lid](out)
                if reference_points.shape[-1] == 4:
                    new_reference = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_reference = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]],
                        -1).sigmoid()
                reference_points = new_reference.detach()
            hs.append(out)
            references.append(reference_points)
        return torch.stack(hs), torch.stack(references)


# --- the whole transformer -----------------------------------------------------------

class DeformableTransformer(nn.Module):
    """Encoder + decoder (+ proposal generation when two_stage).

    Args:
        d_model C, n_heads M, num_encoder_layers, num_decoder_layers, dim_feedforward,
        dropout, num_feature_levels L, enc_n_points / dec_n_points K,
        two_stage (decoder queries from encoder proposals), two_stage_num_proposals
        (how many; = the number of queries), backend (MSDeformAttn backend),
        query_anchors ("none", or "dab": the queries come with learned anchor boxes,
        see ``forward``'s anchors, and the decoder gets a ``ref_point_head``).
    """

    def __init__(self, d_model=256, n_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=1024, dropout=0.1, num_feature_levels=4, dec_n_points=4,
                 enc_n_points=4, two_stage=False, two_stage_num_proposals=300,
                 backend="auto", query_anchors="none"):
        super().__init__()
        if query_anchors not in ("none", "dab"):
            raise ValueError(f"query_anchors must be 'none' or 'dab', got {query_anchors!r}")
        if query_anchors == "dab" and two_stage:
            raise ValueError("query_anchors='dab' and two_stage=True both make the "
                             "decoder's reference boxes; choose one")
        self.query_anchors = query_anchors
        self.d_model, self.n_heads = d_model, n_heads
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        encoder_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, n_heads, enc_n_points,
            backend)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, n_heads, dec_n_points,
            backend)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)
        # which level a token comes from: added to its position code
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        elif query_anchors == "dab":
            self.decoder.ref_point_head = nn.Sequential(
                nn.Linear(2 * d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage and self.query_anchors == "none":
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    # two-stage helpers ---------------------------------------------------------------

    def get_proposal_pos_embed(self, proposals, num_pos_feats=128, temperature=10000):
        """proposals (N, Lq, 4) in inverse-sigmoid space -> (N, Lq, 4 * num_pos_feats)
        sine codes of (cx, cy, w, h) (num_pos_feats = C / 2, giving 2C channels)."""
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
        pos = proposals.sigmoid()[:, :, :, None] * scale / dim_t  # (N, Lq, 4, F)
        pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=4)
        return pos.flatten(2)

    def gen_encoder_output_proposals(self, memory, padding_mask, spatial_shapes):
        """One proposal per encoder token: a box centred on its pixel, of size 0.05 * 2^l
        of the valid image on level l.

        Args:
            memory (N, S, C), padding_mask (N, S), spatial_shapes list of (H_l, W_l).

        Returns:
            output_memory (N, S, C): memory through enc_output + norm, zeroed at padding
            and at proposals too close to the border; output_proposals (N, S, 4) boxes in
            inverse-sigmoid space, +inf where invalid.
        """
        N = memory.shape[0]
        proposals, start = [], 0
        for lvl, (H, W) in enumerate(spatial_shapes):
            mask = padding_mask[:, start:start + H * W].view(N, H, W)
            valid_H = (~mask[:, :, 0]).sum(1)
            valid_W = (~mask[:, 0, :]).sum(1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(H, dtype=torch.float32, device=memory.device),
                torch.arange(W, dtype=torch.float32, device=memory.device), indexing="ij")
            grid = torch.stack([grid_x, grid_y], -1)  # (H, W, 2)
            size = torch.stack([valid_W, valid_H], -1).view(N, 1, 1, 2).float()
            centres = (grid[None] + 0.5) / size  # (N, H, W, 2) in the valid frame
            wh = torch.full_like(centres, 0.05 * (2.0 ** lvl))
            proposals.append(torch.cat([centres, wh], -1).view(N, -1, 4))
            start += H * W
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = padding_mask[..., None] | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        output_memory = memory.masked_fill(invalid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, proposals

    # forward -------------------------------------------------------------------------

    def flatten(self, srcs, masks, pos_embeds):
        """Lists of L maps (N, C, H_l, W_l), masks (N, H_l, W_l), codes (N, C, H_l, W_l)
        -> src (N, S, C), mask (N, S), pos (N, S, C) with the level embedding added,
        spatial_shapes (L, 2) int64, level_start_index (L,) int64, valid_ratios (N, L, 2).
        """
        src_flat, mask_flat, pos_flat, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(src.shape[-2:])
            src_flat.append(src.flatten(2).transpose(1, 2))
            mask_flat.append(mask.flatten(1))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        device = srcs[0].device
        # built from Python ints: known valid, so the fused op never reads them back (sync)
        spatial_shapes, level_start_index = level_tables([tuple(s) for s in shapes], device)
        valid_ratios = torch.stack([valid_ratio(m) for m in masks], 1)
        return (torch.cat(src_flat, 1), torch.cat(mask_flat, 1), torch.cat(pos_flat, 1),
                spatial_shapes, level_start_index, valid_ratios)

    def forward(self, srcs, masks, pos_embeds, query_embed=None, anchors=None):
        """
        Args:
            srcs: list of L maps (N, C, H_l, W_l); masks: list of (N, H_l, W_l) bool;
            pos_embeds: list of (N, C, H_l, W_l); query_embed: (Lq, 2C) learned
            (position, content) of the queries, None in the two-stage variant;
            with query_anchors="dab", (Lq, C) contents only, and anchors (Lq, 4) the
            learned boxes (cx, cy, w, h) in inverse-sigmoid space.

        Returns:
            hs (num_dec_layers, N, Lq, C); init_reference (N, Lq, 2|4) in [0, 1];
            inter_references (num_dec_layers, N, Lq, 2|4); and, two-stage only,
            enc_outputs_class (N, S, num_classes) and enc_outputs_coord_unact
            (N, S, 4) (else None, None).
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage=True")
        src, mask, pos, spatial_shapes, level_start_index, valid_ratios = \
            self.flatten(srcs, masks, pos_embeds)
        memory = self.encoder(src, spatial_shapes, level_start_index, valid_ratios, pos,
                              mask)
        N, _, C = memory.shape
        enc_class = enc_coord_unact = None
        if self.two_stage:
            shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
            output_memory, proposals = self.gen_encoder_output_proposals(memory, mask, shapes)
            head = self.decoder.num_layers  # the extra heads, after the decoder's
            enc_class = self.decoder.class_embed[head](output_memory)
            enc_coord_unact = self.decoder.bbox_embed[head](output_memory) + proposals
            # top-k proposals by their foreground (first class) score. Unlike the
            # official code, padded tokens are excluded (their proposals are +inf).
            score = enc_class[..., 0].masked_fill(mask, float("-inf"))
            topk = min(self.two_stage_num_proposals, score.shape[1])
            topk_index = torch.topk(score, topk, dim=1)[1]
            topk_coords_unact = torch.gather(
                enc_coord_unact, 1, topk_index[..., None].expand(-1, -1, 4)).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans = self.pos_trans_norm(self.pos_trans(
                self.get_proposal_pos_embed(topk_coords_unact, C // 2)))
            query_pos, tgt = torch.split(pos_trans, C, dim=2)
        elif self.query_anchors == "dab":
            if anchors is None or anchors.shape != (query_embed.shape[0], 4):
                raise ValueError(f"query_anchors='dab' needs anchors (Lq, 4) = "
                                 f"({query_embed.shape[0]}, 4), got "
                                 f"{None if anchors is None else tuple(anchors.shape)}")
            tgt = query_embed[None].expand(N, -1, -1)
            reference_points = anchors.sigmoid()[None].expand(N, -1, -1)
            query_pos = None                # made from the box by every decoder layer
        else:
            query_pos, tgt = torch.split(query_embed, C, dim=1)
            query_pos = query_pos[None].expand(N, -1, -1)
            tgt = tgt[None].expand(N, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        init_reference = reference_points
        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes,
                                            level_start_index, valid_ratios, query_pos, mask)
        return hs, init_reference, inter_references, enc_class, enc_coord_unact


def build_deformable_transformer(cfg):
    return DeformableTransformer(
        d_model=cfg.d_model, n_heads=cfg.n_heads, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout, num_feature_levels=cfg.num_feature_levels,
        dec_n_points=cfg.dec_n_points, enc_n_points=cfg.enc_n_points,
        two_stage=cfg.two_stage, two_stage_num_proposals=cfg.num_queries,
        backend=cfg.attention_backend, query_anchors=cfg.query_anchors)
