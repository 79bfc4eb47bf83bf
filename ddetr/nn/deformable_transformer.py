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
model's box heads, passed in as ``box_heads``, update it after every layer; in the
two-stage variant the initial reference boxes are the top-scoring encoder proposals,
scored by the model's ``proposal_heads``. Heads go in, outputs come out: the
transformer never reaches into the model that calls it.

Coordinates. Reference points live in [0, 1] of the *valid* (unpadded) image, the frame
the boxes are predicted in. Each map of a padded batch has ``valid_ratios`` (N, L, 2) =
(valid W / W, valid H / H); multiplying by it gives the point in the padded map's
[0, 1] frame that the sampling operator uses. This is what makes the result of an image
independent of how much padding its batch added.

Parameter names (``level_embed``, ``encoder.layers.{i}.self_attn``, ``norm1``,
``linear1``, ``decoder.layers.{i}.cross_attn``, ``reference_points``, ``enc_output``,
``pos_trans``...) follow the official implementation.

The dense baseline. With ``attention="dense"`` the encoder's self-attention and the
decoder's cross-attention are DETR's (``DenseCrossAttention``, called exactly as
MSDeformAttn is, so no layer asks which it holds): every query attends to all S
tokens, keys carry their position codes (key = token + pos), values do not.
Everything else stays as it is -- input projections, level embeddings, reference
points and the boxes predicted relative to them, refinement, two-stage proposals,
initialisation -- so that a model with dense attention differs from Deformable DETR
in its attention only (chapter 7's baseline). The reference points then serve the
boxes, not the sampling.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..ops.checks import level_shapes, level_tables
from .attention import MultiHeadAttention
from .checks import (check_dropout, check_heads, check_like, check_padding_mask, check_same,
                     check_spatial_shapes, check_tensor, check_width, shape)
from .dense_cross_attention import DenseCrossAttention
from .geometry import (decode_boxes, pixel_centres, size_tensor, to_padded_levels, valid_ratio,
                       valid_size)
from .helpers import get_clones, with_pos
from .ms_deform_attn import MSDeformAttn, set_attention_backend
from .position_encoding import sine_embed


ATTENTIONS = ("deformable", "dense")


def make_attention(kind, d_model, n_levels, n_heads, n_points, dropout):
    """The attention of an encoder layer (self) or decoder layer (cross): MSDeformAttn,
    or with kind="dense" DETR's attention over all tokens of all levels
    (``DenseCrossAttention``, called as MSDeformAttn is). The backend of MSDeformAttn
    is set on the built model (``set_attention_backend``)."""
    if kind not in ATTENTIONS:
        raise ValueError(f"attention must be one of {list(ATTENTIONS)}, got {kind!r}")
    if kind == "dense":
        return DenseCrossAttention(d_model, n_heads, dropout=dropout)
    return MSDeformAttn(d_model, n_levels, n_heads, n_points)


def check_valid_ratios(valid_ratios, N, L):
    check_tensor("valid_ratios", valid_ratios, "(N, L, 2)")
    if shape(valid_ratios) != (N, L, 2):
        raise ValueError(f"valid_ratios must be (N, L, 2) = {(N, L, 2)}, got shape "
                         f"{shape(valid_ratios)}")


# --- encoder -------------------------------------------------------------------------

class DeformableTransformerEncoderLayer(nn.Module):
    """MSDeformAttn (or, attention="dense", dense) self-attention + FFN, post-norm.
    (N, S, C) -> (N, S, C)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8,
                 n_points=4, attention="deformable"):
        super().__init__()
        self.n_levels, self.d_model = n_levels, d_model
        self.self_attn = make_attention(attention, d_model, n_levels, n_heads, n_points,
                                        dropout)
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
                              level_start_index, padding_mask, pos)
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
        points = []
        for lvl, (H, W) in enumerate(spatial_shapes):
            # the valid image's size in pixels of this map: (valid W, valid H)
            size = valid_ratios[:, lvl] * size_tensor(W, H, valid_ratios.dtype,
                                                      valid_ratios.device)
            points.append(pixel_centres(H, W, size[:, None], device=valid_ratios.device))
        points = torch.cat(points, 1)  # (N, S, 2) in the valid frame
        return to_padded_levels(points, valid_ratios)

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos=None,
                padding_mask=None):
        """src (N, S, C), spatial_shapes (L, 2) int64, level_start_index (L,),
        valid_ratios (N, L, 2), pos (N, S, C), padding_mask (N, S) -> memory (N, S, C)."""
        check_tensor("src", src, "(N, S, C)")
        N, S, C = src.shape
        L = self.layers[0].n_levels
        check_width("src", src, self.layers[0].d_model)
        check_spatial_shapes("spatial_shapes", spatial_shapes, L, S)
        check_valid_ratios(valid_ratios, N, L)
        check_like("pos", pos, src, "src")
        check_padding_mask("padding_mask", padding_mask, N, S)
        shapes = level_shapes(spatial_shapes)   # no device sync for the model's own tables
        reference_points = self.get_reference_points(shapes, valid_ratios).to(src.dtype)
        out = src
        for layer in self.layers:
            out = layer(out, pos, reference_points, spatial_shapes, level_start_index,
                        padding_mask)
        return out


# --- decoder -------------------------------------------------------------------------

class DeformableTransformerDecoderLayer(nn.Module):
    """Dense self-attention among queries, MSDeformAttn (or, attention="dense", dense)
    cross-attention, FFN; post-norm.

    (Official names: norm2 follows self-attention, norm1 cross-attention, norm3 the FFN.)
    """

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8,
                 n_points=4, attention="deformable"):
        super().__init__()
        self.n_levels = n_levels
        self.cross_attn = make_attention(attention, d_model, n_levels, n_heads, n_points,
                                         dropout)
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
                level_start_index, padding_mask=None, src_pos=None, self_attn_mask=None):
        """tgt, query_pos (N, Lq, C); reference_points (N, Lq, L, 2|4);
        src (N, S, C) the encoder memory; padding_mask (N, S); src_pos (N, S, C) the
        memory's position codes (dense attention only: its keys); self_attn_mask
        (Lq, Lq) bool, True where a query may not see another -> (N, Lq, C)."""
        q = k = with_pos(tgt, query_pos)
        attn, _ = self.self_attn(q, k, tgt, attn_mask=self_attn_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        attn = self.cross_attn(with_pos(tgt, query_pos), reference_points, src,
                               spatial_shapes, level_start_index, padding_mask, src_pos)
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerDecoder(nn.Module):
    """A stack of decoder layers that returns every layer's output.

    With iterative box refinement, ``forward`` is given ``box_heads`` (one per layer)
    and moves the reference boxes with them after each layer. The decoder owns no head:
    for the official state-dict names, a detector lists its heads under the decoder's
    ``bbox_embed`` (and ``class_embed``), and passes them to every forward call.

    Look forward twice (DINO, Zhang et al., ICLR 2023, Sec. 3.5; training only, the
    outputs are the same): the references returned are the refined boxes *before* the
    detach, so the loss on layer i's box, which the model decodes relative to layer
    i-1's reference, also trains layer i-1 (the next layer's input stays detached).
    A detector sets ``look_forward_twice``.

    With DAB-style anchor queries the transformer sets ``ref_point_head`` (an MLP
    2C -> C): every layer then makes its positional query from the current reference
    box, ``query_pos = ref_point_head(sine_embed(box))``, so that the query's
    position follows the box as it is refined.
    """

    def __init__(self, decoder_layer, num_layers):
        super().__init__()
        self.layers = get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.ref_point_head = None
        self.look_forward_twice = False

    def check_inputs(self, tgt, reference_points, valid_ratios, query_pos, box_heads):
        """Raise TypeError/ValueError unless ``forward``'s own inputs fit. The memory,
        its position codes, the level tables and the padding mask go to every layer's
        attention as they are, and are checked there."""
        check_tensor("tgt", tgt, "(N, Lq, C)")
        check_tensor("reference_points", reference_points, "(N, Lq, 2|4)")
        N, Lq, _ = tgt.shape
        if reference_points.shape[:2] != (N, Lq) or reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points must be (N, Lq, 2 or 4) = ({N}, {Lq}, 2|4) "
                             f"like tgt, got {shape(reference_points)}")
        check_valid_ratios(valid_ratios, N, self.layers[0].n_levels)
        if query_pos is None and self.ref_point_head is None:
            raise ValueError("query_pos (N, Lq, C) is required (it is made from the "
                             "reference boxes only with DAB anchors), got None")
        check_like("query_pos", query_pos, tgt, "tgt")
        if box_heads is not None and len(box_heads) < self.num_layers:
            raise ValueError(f"box_heads must hold a head per decoder layer "
                             f"({self.num_layers}), got {len(box_heads)}")

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index,
                valid_ratios, query_pos=None, padding_mask=None, box_heads=None,
                src_pos=None, self_attn_mask=None):
        """
        Args:
            tgt: (N, Lq, C) query contents. query_pos: (N, Lq, C) query positions.
            reference_points: (N, Lq, 2) points or (N, Lq, 4) boxes (cx, cy, w, h),
                in [0, 1] of the valid image.
            src: (N, S, C) memory. valid_ratios: (N, L, 2). padding_mask: (N, S).
            src_pos: (N, S, C) the memory's position codes; dense attention adds them
                to its keys (required there), MSDeformAttn does not use them.
            (src, src_pos, spatial_shapes, level_start_index and padding_mask are
            checked by the layers' cross-attention.)
            box_heads: None, or a box head per layer ((N, Lq, C) -> (N, Lq, 4) offsets
                in inverse-sigmoid space, see ``decode_boxes``) to refine the
                reference boxes with after each layer.
            self_attn_mask: (Lq, Lq) bool or None, True where a query may not see
                another in self-attention (denoising groups, ``ddetr.models.denoising``).

        Returns:
            hs (num_layers, N, Lq, C), the output of each layer, and references
            (num_layers, N, Lq, 2|4), the reference points each layer's output is
            relative to for the *next* layer (detached, as in the paper, unless
            look_forward_twice).
        """
        self.check_inputs(tgt, reference_points, valid_ratios, query_pos, box_heads)
        out = tgt
        hs, references = [], []
        for lid, layer in enumerate(self.layers):
            reference_input = to_padded_levels(reference_points, valid_ratios)
            if self.ref_point_head is not None:   # DAB: the position comes from the box
                query_pos = self.ref_point_head(
                    sine_embed(reference_points, out.shape[-1] // 2))
            out = layer(out, query_pos, reference_input, src, spatial_shapes,
                        level_start_index, padding_mask, src_pos, self_attn_mask)
            refined = reference_points
            if box_heads is not None:
                refined = decode_boxes(box_heads[lid](out), reference_points)
                reference_points = refined.detach()
            hs.append(out)
            references.append(refined if self.look_forward_twice else reference_points)
        return torch.stack(hs), torch.stack(references)


# --- the whole transformer -----------------------------------------------------------

class DeformableTransformer(nn.Module):
    """Encoder + decoder (+ proposal generation when two_stage).

    Args:
        d_model C, n_heads M, num_encoder_layers, num_decoder_layers, dim_feedforward,
        dropout, num_feature_levels L, enc_n_points / dec_n_points K,
        two_stage (decoder queries from encoder proposals), two_stage_num_proposals
        (how many; = the number of queries),
        attention ("deformable", or "dense": the baseline of the module docstring),
        query_anchors ("none", or "dab": the queries come with learned anchor boxes,
        see ``forward``'s anchors, and the decoder gets a ``ref_point_head``).

    The MSDeformAttn modules run on backend "auto"; ``set_attention_backend(model,
    backend)`` (``ddetr.nn``) changes it for all of them, as ``build_deformable_transformer``
    does with a config's ``attention_backend``.
    """

    def __init__(self, d_model=256, n_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=1024, dropout=0.1, num_feature_levels=4, dec_n_points=4,
                 enc_n_points=4, two_stage=False, two_stage_num_proposals=300,
                 query_anchors="none", attention="deformable"):
        super().__init__()
        check_heads(d_model, n_heads, num_encoder_layers=num_encoder_layers,
                    num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward,
                    num_feature_levels=num_feature_levels, dec_n_points=dec_n_points,
                    enc_n_points=enc_n_points, two_stage_num_proposals=two_stage_num_proposals)
        check_dropout(dropout)
        if query_anchors not in ("none", "dab"):
            raise ValueError(f"query_anchors must be 'none' or 'dab', got {query_anchors!r}")
        if query_anchors == "dab" and two_stage:
            raise ValueError("query_anchors='dab' and two_stage=True both make the "
                             "decoder's reference boxes; choose one")
        self.query_anchors, self.attention = query_anchors, attention
        self.d_model, self.n_heads = d_model, n_heads
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        encoder_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, n_heads, enc_n_points,
            attention)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, n_heads, dec_n_points,
            attention)
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

    def gen_encoder_output_proposals(self, memory, padding_mask, spatial_shapes):
        """One proposal per encoder token: a box centred on its pixel, of size 0.05 * 2^l
        of the valid image on level l = 0, 1, ... (the paper's 0.05 * 2^(l-1) with levels
        counted from 1, Appendix A.4).

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
            size = valid_size(mask).float()[:, None]  # (N, 1, 2) (valid W, valid H)
            centres = pixel_centres(H, W, size, device=memory.device)  # (N, H*W, 2)
            wh = torch.full_like(centres, 0.05 * (2.0 ** lvl))
            proposals.append(torch.cat([centres, wh], -1))
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

    def check_inputs(self, srcs, masks, pos_embeds, query_embed):
        """Raise TypeError/ValueError unless the lists of maps, masks and position codes
        and the query embedding fit the transformer (see ``forward``)."""
        L = self.level_embed.shape[0]
        for name, items in (("srcs", srcs), ("masks", masks), ("pos_embeds", pos_embeds)):
            if not isinstance(items, (list, tuple)) or len(items) != L:
                raise ValueError(f"{name} must be a list of num_feature_levels={L} tensors, "
                                 f"got {type(items).__name__} of "
                                 f"{len(items) if isinstance(items, (list, tuple)) else '?'}")
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            check_tensor(f"srcs[{lvl}]", src, "(N, C, H, W)")
            if src.shape[1] != self.d_model:
                raise ValueError(f"srcs[{lvl}] must be (N, C, H, W) with C = d_model = "
                                 f"{self.d_model}, got shape {shape(src)}")
            check_tensor(f"masks[{lvl}]", mask, "(N, H, W)", floating=False)
            if mask.dtype != torch.bool or mask.shape != src.shape[:1] + src.shape[2:]:
                raise ValueError(f"masks[{lvl}] must be a bool (N, H, W) = "
                                 f"{shape(src)[:1] + shape(src)[2:]} tensor, got "
                                 f"{mask.dtype} {shape(mask)}")
            check_tensor(f"pos_embeds[{lvl}]", pos, "(N, C, H, W)")
            if pos.shape != src.shape:
                raise ValueError(f"pos_embeds[{lvl}] must have the shape of srcs[{lvl}] "
                                 f"{shape(src)}, got {shape(pos)}")
            check_same("batch size", **{"srcs[0]": srcs[0], f"srcs[{lvl}]": src})
        if self.two_stage:
            return
        if query_embed is None:
            raise ValueError("query_embed is required unless two_stage=True, got None")
        width = self.d_model if self.query_anchors == "dab" else 2 * self.d_model
        check_tensor("query_embed", query_embed, "(Lq, C)")
        if query_embed.shape[1] != width:
            raise ValueError(f"query_embed must be (Lq, {width}), got shape "
                             f"{shape(query_embed)}")

    def forward(self, srcs, masks, pos_embeds, query_embed=None, anchors=None,
                box_heads=None, proposal_heads=None, denoising=None, one_to_many=0,
                self_attn_mask=None):
        """
        Args:
            srcs: list of L maps (N, C, H_l, W_l); masks: list of (N, H_l, W_l) bool;
            pos_embeds: list of (N, C, H_l, W_l); query_embed: (Lq, 2C) learned
            (position, content) of the queries, None in the two-stage variant;
            with query_anchors="dab", (Lq, C) contents only, and anchors (Lq, 4) the
            learned boxes (cx, cy, w, h) in inverse-sigmoid space.
            box_heads: iterative refinement: a box head per decoder layer (see
                ``DeformableTransformerDecoder``); None: the references stay.
            proposal_heads: two-stage only: (class head, box head) that score every
                encoder token's proposal and regress its box.
            denoising: training only, None or DN-DETR's denoising queries
                (``ddetr.models.denoising.DenoisingQueries``: tgt (N, Ldn, C), boxes
                (N, Ldn, 4)), put before the Lq queries; they need 4-d reference boxes
                (two-stage or DAB anchors).
            one_to_many: training only, two-stage only: L_extra more proposals kept
                after the Lq, as H-DETR's one-to-many queries
                (``ddetr.models.hybrid_matching``).
            self_attn_mask: (Ldn + Lq + L_extra)^2 bool or None, True where a query
                may not see another (denoising groups, the one-to-many set).

        Returns:
            hs (num_dec_layers, N, Lall, C) for Lall = Ldn + Lq + L_extra;
            init_reference (N, Lall, 2|4) in [0, 1]; inter_references
            (num_dec_layers, N, Lall, 2|4); and, two-stage only, enc_outputs_class
            (N, S, num_classes) and enc_outputs_coord_unact (N, S, 4) (else None,
            None). Ldn = 0 without denoising, L_extra = 0 without one_to_many.
        """
        self.check_inputs(srcs, masks, pos_embeds, query_embed)
        if self.two_stage and proposal_heads is None:
            raise ValueError("two_stage=True needs proposal_heads (class head, box head), "
                             "got None")
        src, mask, pos, spatial_shapes, level_start_index, valid_ratios = \
            self.flatten(srcs, masks, pos_embeds)
        memory = self.encoder(src, spatial_shapes, level_start_index, valid_ratios, pos,
                              mask)
        enc_class = enc_coord_unact = None
        if self.two_stage:
            (tgt, reference_points, query_pos, enc_class,
             enc_coord_unact) = self.proposal_queries(memory, mask, spatial_shapes,
                                                      proposal_heads, one_to_many)
        else:
            if one_to_many:
                raise ValueError("one_to_many queries are extra proposals: they need "
                                 "two_stage=True")
            tgt, reference_points, query_pos = self.learned_queries(
                query_embed, anchors, memory.shape[0])
        if denoising is not None:
            tgt, reference_points, query_pos = self.with_denoising(
                denoising, tgt, reference_points, query_pos)
        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes,
                                            level_start_index, valid_ratios, query_pos, mask,
                                            box_heads, pos, self_attn_mask)
        return hs, reference_points, inter_references, enc_class, enc_coord_unact

    def proposal_queries(self, memory, mask, spatial_shapes, proposal_heads, extra=0):
        """Two-stage: every encoder token's proposal scored and regressed by
        proposal_heads; the top Lq (+ extra: H-DETR's one-to-many set) by foreground
        (first class) score become the decoder's reference boxes, and their sine codes
        its queries. Unlike the official code, padded tokens are excluded (their
        proposals are +inf).

        Returns tgt, reference_points (N, Lq, 4) in [0, 1], query_pos, and every
        token's class logits (N, S, num_classes) and boxes (N, S, 4) (inverse-sigmoid).
        """
        C = memory.shape[-1]
        shapes = level_shapes(spatial_shapes)   # no device sync for the model's own tables
        output_memory, proposals = self.gen_encoder_output_proposals(memory, mask, shapes)
        class_head, box_head = proposal_heads
        enc_class = class_head(output_memory)
        enc_coord_unact = box_head(output_memory) + proposals
        # top-k proposals by their foreground (first class) score; padded tokens are
        # excluded (their proposals are +inf)
        score = enc_class[..., 0].masked_fill(mask, float("-inf"))
        topk = min(self.two_stage_num_proposals + extra, score.shape[1])
        topk_index = torch.topk(score, topk, dim=1)[1]
        topk_coords_unact = torch.gather(
            enc_coord_unact, 1, topk_index[..., None].expand(-1, -1, 4)).detach()
        reference_points = topk_coords_unact.sigmoid()
        query_pos, tgt = self.box_queries(reference_points).split(C, dim=2)
        return tgt, reference_points, query_pos, enc_class, enc_coord_unact

    def box_queries(self, boxes):
        """Two-stage: boxes (N, Lq, 4) in [0, 1] -> (N, Lq, 2C), their (position,
        content) queries: a linear layer and a norm over the boxes' sine codes."""
        return self.pos_trans_norm(self.pos_trans(sine_embed(boxes, self.d_model // 2)))

    def learned_queries(self, query_embed, anchors, N):
        """The queries of the one-stage variants: with DAB anchors, learned contents
        and anchor boxes (the decoder makes the positions from the boxes: query_pos
        None); else learned (position, content) pairs, with a reference point made from
        the position. Returns tgt (N, Lq, C), reference_points (N, Lq, 2|4), query_pos."""
        if self.query_anchors == "dab":
            if anchors is None or anchors.shape != (query_embed.shape[0], 4):
                raise ValueError(f"query_anchors='dab' needs anchors (Lq, 4) = "
                                 f"({query_embed.shape[0]}, 4), got "
                                 f"{None if anchors is None else tuple(anchors.shape)}")
            return (query_embed[None].expand(N, -1, -1),
                    anchors.sigmoid()[None].expand(N, -1, -1), None)
        query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
        query_pos = query_pos[None].expand(N, -1, -1)
        return (tgt[None].expand(N, -1, -1), self.reference_points(query_pos).sigmoid(),
                query_pos)

    def with_denoising(self, dn, tgt, reference_points, query_pos):
        """The denoising queries ``dn`` put before the matching ones: contents,
        reference boxes and (two-stage) positions made from the boxes as the
        proposals' are; DAB makes positions from the boxes in every layer."""
        if reference_points.shape[-1] != 4:
            raise ValueError("denoising queries need 4-d reference boxes: build the "
                             "transformer with two_stage=True or query_anchors='dab'")
        if query_pos is not None:
            dn_pos = self.box_queries(dn.boxes)[..., :self.d_model]
            query_pos = torch.cat([dn_pos.to(query_pos.dtype), query_pos], 1)
        return (torch.cat([dn.tgt.to(tgt.dtype), tgt], 1),
                torch.cat([dn.boxes.to(reference_points.dtype), reference_points], 1),
                query_pos)


def build_deformable_transformer(cfg):
    """The transformer of cfg, its MSDeformAttn modules on cfg.attention_backend."""
    transformer = DeformableTransformer(
        d_model=cfg.d_model, n_heads=cfg.n_heads, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout, num_feature_levels=cfg.num_feature_levels,
        dec_n_points=cfg.dec_n_points, enc_n_points=cfg.enc_n_points,
        two_stage=cfg.two_stage, two_stage_num_proposals=cfg.num_queries,
        query_anchors=cfg.query_anchors, attention=cfg.attention)
    return set_attention_backend(transformer, cfg.attention_backend)
