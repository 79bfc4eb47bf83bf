"""Multi-scale deformable attention in pure PyTorch, vectorised with grid_sample.

For every query q, head m, level l and point k, the operator reads the value map of
level l at a fractional location p (bilinear interpolation) and sums the samples with
the attention weights:

    out[n, q, m] = sum_l sum_k  A[n, q, m, l, k] * V_l[n, :, m](p[n, q, m, l, k])

grid_sample does the bilinear reads. Its grid lives in [-1, 1] with
``align_corners=False``: -1 is the left edge of the first pixel, so pixel j has its
centre at (j + 0.5) / W in [0, 1] coordinates, the convention of the whole library.
Samples outside the map read zeros (``padding_mode="zeros"``).
"""
import torch
import torch.nn.functional as F

from .checks import check_ms_deform_attn_inputs, checked_levels


def ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                             sampling_locations, attention_weights):
    """Pure PyTorch multi-scale deformable attention.

    Args:
        value: (N, S, M, D) values of all levels, flattened level after level.
        spatial_shapes: (L, 2) int64, (H_l, W_l) of each level.
        level_start_index: (L,) int64, where each level starts in S.
        sampling_locations: (N, Lq, M, L, K, 2), (x, y) normalised to [0, 1].
        attention_weights: (N, Lq, M, L, K).

    Returns:
        (N, Lq, M * D) in the dtype of value (a float16/bfloat16 value with float32
        locations and weights, allowed on a GPU, is sampled in float32).
    """
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights)
    if value.dtype != sampling_locations.dtype:  # float16/bfloat16 value on a GPU
        return ms_deform_attn_reference(value.to(sampling_locations.dtype), spatial_shapes,
                                        level_start_index, sampling_locations,
                                        attention_weights).to(value.dtype)
    N, S, M, D = value.shape
    _, Lq, _, L, K, _ = sampling_locations.shape
    shapes = checked_levels(spatial_shapes, level_start_index, S).shapes  # no sync twice
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # [0, 1] -> [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_levels[lvl].flatten(2).transpose(1, 2).reshape(N * M, D, h, w)
        # (N, Lq, M, K, 2) -> (N*M, Lq, K, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # (N*M, D, Lq, K)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    # (N, Lq, M, L, K) -> (N*M, 1, Lq, L*K)
    w = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * K)
    out = (torch.stack(samples, dim=-2).flatten(-2) * w).sum(-1)  # (N*M, D, Lq)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()
