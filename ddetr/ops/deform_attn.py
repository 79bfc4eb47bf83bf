"""Single-scale deformable attention, with bilinear sampling written out by hand.

A query does not look at every pixel. It looks at K points around its reference
point, each point reached by a learned offset, and mixes what it reads there with K
attention weights that sum to one. Every head m has its own points and weights:

    out[n, q, m] = sum_k A[n, q, m, k] * V[n, :, m](p[n, q, m, k])

The sampling ``V(p)`` at a fractional location is bilinear interpolation, implemented
here with gathers (no grid_sample), which makes this file a second, independent
vectorised formulation next to ``ms_deform_attn_reference``.
"""


def bilinear_sample(value, spatial_shape, locations):
    """Bilinear reads of a flattened map, zero outside, pixel centres at (j + 0.5) / W.

    Args:
        value: (B, H*W, C) the map, row-major (index = row * W + col).
        spatial_shape: (H, W) as Python ints.
        locations: (B, P, 2) points (x, y) normalised to [0, 1].

    Returns:
        (B, P, C) the interpolated values.
    """
    H, W = spatial_shape
    B, HW, C = value.shape
    if HW != H * W:
        raise ValueError(f"value has {HW} positions but spatial_shape {(H, W)} has {H * W}")
    u = locations[..., 0] * W - 0.5  # (B, P) column in pixel units, centres at integers
    v = locations[..., 1] * H - 0.5
    u0 = u.floor()
    v0 = v.floor()
    fu = u - u0  # how far past column u0 the point lies, in [0, 1)
    fv = v - v0
    out = value.new_zeros(B, locations.shape[1], C)
    for dv, wv in ((0, 1 - fv), (1, fv)):
        for du, wu in ((0, 1 - fu), (1, fu)):
            col = u0 + du
            row = v0 + dv
            inside = (col >= 0) & (col < W) & (row >= 0) & (row < H)
            index = (row.clamp(0, H - 1) * W + col.clamp(0, W - 1)).long()  # (B, P)
            corner = value.gather(1, index.unsqueeze(-1).expand(-1, -1, C))
            out = out + corner * (wv * wu * inside).unsqueeze(-1)
    return out


def deform_attn(value, spatial_shape, sampling_locations, attention_weights):
    """Single-scale deformable attention.

    Args:
        value: (N, H*W, M, D) values, one D-dim vector per pixel and head.
        spatial_shape: (H, W) of the map, Python ints.
        sampling_locations: (N, Lq, M, K, 2) points (x, y) in [0, 1].
        attention_weights: (N, Lq, M, K), normally a softmax over K.

    Returns:
        (N, Lq, M*D)
    """
    if value.dim() != 4:
        raise ValueError(f"value must be (N, H*W, M, D), got shape {tuple(value.shape)}")
    N, HW, M, D = value.shape
    if sampling_locations.dim() != 5 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be (N, Lq, M, K, 2), "
                         f"got shape {tuple(sampling_locations.shape)}")
    _, Lq, _, K, _ = sampling_locations.shape
    if tuple(sampling_locations.shape[:3]) != (N, Lq, M):
        raise ValueError(f"sampling_locations must be (N, Lq, M, K, 2) with N={N}, M={M}, "
                         f"got shape {tuple(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != (N, Lq, M, K):
        raise ValueError(f"attention_weights must be (N, Lq, M, K) = {(N, Lq, M, K)}, "
                         f"got shape {tuple(attention_weights.shape)}")
    # one map per (batch, head): (N*M, H*W, D); its points: (N*M, Lq*K, 2)
    v = value.transpose(1, 2).reshape(N * M, HW, D)
    p = sampling_locations.transpose(1, 2).reshape(N * M, Lq * K, 2)
    samples = bilinear_sample(v, spatial_shape, p).view(N, M, Lq, K, D)
    a = attention_weights.transpose(1, 2).unsqueeze(-1)  # (N, M, Lq, K, 1)
    out = (samples * a).sum(3)  # (N, M, Lq, D)
    return out.transpose(1, 2).reshape(N, Lq, M * D)
