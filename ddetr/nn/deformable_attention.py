"""Single-scale deformable attention as a module.

From each query vector, two small linear layers predict, per head m and point k,
an offset (dx, dy) in pixels of the map and an attention logit. The sampling
location is the query's reference point plus the offset; the K logits of a head
go through a softmax. The values are a linear projection of the map, split in heads.
"""
import math

import torch
from torch import nn

from ..ops.deform_attn import deform_attn
from .checks import (check_heads, check_padding_mask, check_positive_ints, check_same,
                     check_tensor, check_width, shape)


# Appendix A.4 of the paper (Zhu et al., ICLR 2021): with M = 8 heads, the offset biases
# put point k = 1..K of head m at k times direction m, in pixels of the map (x, y):
PAPER_A4_DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def star_offsets(n_heads, n_levels, n_points):
    """The initial sampling offsets (M, L, K, 2), in pixels of each level, as (x, y).

    Head m points in the direction of angle 2 pi m / M, scaled so that the larger of
    |dx|, |dy| is 1 pixel; point k = 0..K-1 sits at k + 1 times that step, the same on
    every level. For M = 8 the directions are the paper's eight of Appendix A.4 in
    another head order; the paper gives no rule for other M, and this one spreads any M
    evenly around the circle (the official implementation's).
    """
    angles = torch.arange(n_heads, dtype=torch.float32) * (2.0 * math.pi / n_heads)
    grid = torch.stack([angles.cos(), angles.sin()], -1)  # (M, 2)
    grid = grid / grid.abs().max(-1, keepdim=True)[0]
    grid = grid.view(n_heads, 1, 1, 2).repeat(1, n_levels, n_points, 1)
    return grid * torch.arange(1, n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)


def init_deformable_attention(module, n_heads, n_levels, n_points):
    """The paper's initialisation of a (multi-scale) deformable attention module (A.4).

    Offset predictor: weights zero, bias ``star_offsets``: at initialisation the M*K
    points form rays around the reference point. Attention-weight predictor: all zero,
    so the weights start uniform, 1 / (L K). Value and output projections:
    Xavier-uniform weights, zero bias. (With box references, A.4 also scales the
    decoder's initial offsets by 1 / (2K); ``MSDeformAttn.sampling`` does it for every
    offset, by dividing by K and multiplying by half the box.)
    """
    sampling_offsets = module.sampling_offsets
    nn.init.zeros_(sampling_offsets.weight)
    with torch.no_grad():
        sampling_offsets.bias.copy_(star_offsets(n_heads, n_levels, n_points).flatten())
    nn.init.zeros_(module.attention_weights.weight)
    nn.init.zeros_(module.attention_weights.bias)
    for proj in (module.value_proj, module.output_proj):
        nn.init.xavier_uniform_(proj.weight)
        nn.init.zeros_(proj.bias)


class DeformableAttention(nn.Module):
    """Deformable attention over one feature map.

    Args:
        d_model: C. n_heads: M (D = C / M). n_points: K, sampled points per head.
    """

    def __init__(self, d_model=256, n_heads=8, n_points=4):
        super().__init__()
        check_heads(d_model, n_heads, n_points=n_points)
        self.d_model, self.n_heads, self.n_points = d_model, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        init_deformable_attention(self, self.n_heads, 1, self.n_points)

    def sampling(self, query, reference_points, spatial_shape):
        """Where each head looks, and how much.

        query (N, Lq, C); reference_points (N, Lq, 2) as (x, y) in [0, 1];
        spatial_shape (H, W). Returns sampling_locations (N, Lq, M, K, 2) and
        attention_weights (N, Lq, M, K) (softmax over K).
        """
        N, Lq, _ = query.shape
        M, K = self.n_heads, self.n_points
        H, W = spatial_shape
        offsets = self.sampling_offsets(query).view(N, Lq, M, K, 2)
        scale = offsets.new_tensor([W, H])  # offsets are in pixels of the map
        locations = reference_points[:, :, None, None, :] + offsets / scale
        weights = self.attention_weights(query).view(N, Lq, M, K).softmax(-1)
        return locations, weights

    def forward(self, query, reference_points, input_flatten, spatial_shape,
                input_padding_mask=None):
        """query (N, Lq, C), reference_points (N, Lq, 2), input_flatten (N, H*W, C),
        spatial_shape (H, W), input_padding_mask (N, H*W) bool or None -> (N, Lq, C)."""
        check_tensor("query", query, "(N, Lq, C)")
        check_width("query", query, self.d_model)
        check_tensor("input_flatten", input_flatten, "(N, S, C)")
        check_width("input_flatten", input_flatten, self.d_model)
        check_tensor("reference_points", reference_points, "(N, Lq, 2)")
        if shape(reference_points) != shape(query)[:2] + (2,):
            raise ValueError(f"reference_points must be (N, Lq, 2) = "
                             f"{shape(query)[:2] + (2,)}, got {shape(reference_points)}")
        check_same("batch size", query=query, input_flatten=input_flatten)
        check_same("device", query=query, reference_points=reference_points,
                   input_flatten=input_flatten)
        if len(spatial_shape) != 2:
            raise ValueError(f"spatial_shape must be (H, W), got {spatial_shape!r}")
        H, W = spatial_shape
        check_positive_ints(H=H, W=W)
        N, S, C = input_flatten.shape
        if S != H * W:
            raise ValueError(f"input_flatten has {S} positions, spatial_shape {(H, W)} "
                             f"needs {H * W}")
        check_padding_mask("input_padding_mask", input_padding_mask, N, S)
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, self.n_heads, C // self.n_heads)
        locations, weights = self.sampling(query, reference_points, spatial_shape)
        return self.output_proj(deform_attn(value, (H, W), locations, weights))
