"""Multi-scale deformable attention as an explicit loop: the definition, spelled out.

Slow on purpose. Every sample is one bilinear interpolation written by hand, so this
function shares no code path with grid_sample or with the fused kernel, and the tests
use it as an independent oracle. Use it on a few queries only.

Bilinear interpolation with zero padding: in pixel units of a level of size (H, W),
the location x in [0, 1] is at column u = x * W - 0.5 (pixel centres at integers).
The four neighbours (floor(u), floor(v)) .. (floor(u)+1, floor(v)+1) are weighted by
the areas of the opposite rectangles; a neighbour outside the map contributes zero.
"""
import math

import torch

from .checks import check_ms_deform_attn_inputs


def bilinear_at(value_map, x, y):
    """Read one point of a (H, W, D) map at normalised (x, y); zeros outside.

    x and y are 0-dim tensors (so gradients flow into them); returns (D,).
    """
    H, W, D = value_map.shape
    u = x * W - 0.5
    v = y * H - 0.5
    u0 = math.floor(u.item())
    v0 = math.floor(v.item())
    fu = u - u0  # fraction to the right of column u0
    fv = v - v0  # fraction below row v0
    out = value_map.new_zeros(D)
    for dv, wv in ((0, 1 - fv), (1, fv)):
        for du, wu in ((0, 1 - fu), (1, fu)):
            row, col = v0 + dv, u0 + du
            if 0 <= row < H and 0 <= col < W:
                out = out + wv * wu * value_map[row, col]
    return out


def ms_deform_attn_naive(value, spatial_shapes, level_start_index,
                         sampling_locations, attention_weights):
    """Same arguments and result as ``ms_deform_attn_reference``: (N, Lq, M*D)."""
    check_ms_deform_attn_inputs(value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights)
    N, S, M, D = value.shape
    _, Lq, _, L, K, _ = sampling_locations.shape
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    rows = []
    for n in range(N):
        for q in range(Lq):
            heads = []
            for m in range(M):
                acc = value.new_zeros(D)
                for lvl in range(L):
                    h, w = shapes[lvl]
                    # the keys of this level and head, back on their (H, W) grid
                    level_map = value[n, starts[lvl]:starts[lvl] + h * w, m].reshape(h, w, D)
                    for k in range(K):
                        x, y = sampling_locations[n, q, m, lvl, k]
                        a = attention_weights[n, q, m, lvl, k]
                        acc = acc + a * bilinear_at(level_map, x, y)
                heads.append(acc)
            rows.append(torch.cat(heads))
    if not rows:
        return value.new_zeros(N, Lq, M * D)
    return torch.stack(rows).view(N, Lq, M * D)
