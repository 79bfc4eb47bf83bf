"""Two attention heads built by hand, whose behaviour is known before they run: one
attends by colour, one by position (chapter 1 shows dense attention with them).
"""
import torch

from ..nn.geometry import pixel_centres


def handmade_heads(features, colour_scale=30.0, position_scale=60.0):
    """Queries and keys of two hand-built attention heads over a feature map.

    A trained detector learns its query and key projections; here they are written
    down so that what each head does is known in advance:

    - head 0, *colour*: q = k = colour_scale * (feature - mean feature), so a pixel
      attends to pixels of a similar colour;
    - head 1, *position*: q_i . k_j = position_scale * (2 p_i . p_j - |p_j|^2), which is
      -position_scale |p_i - p_j|^2 up to a term constant over keys (the softmax
      ignores it), so a pixel attends to its neighbourhood.

    Args:
        features: (h, w, 3) tensor, e.g. from ``pixel_features``.

    Returns:
        q, k: (1, 2, h*w, 3) tensors (N=1, M=2 heads, D=3); scaled_dot_product_attention
        divides by sqrt(3), included in the scales' effect.
    """
    h, w, c = features.shape
    if c != 3:
        raise ValueError(f"features must be (h, w, 3), got {tuple(features.shape)}")
    f = features.reshape(h * w, 3)
    colour = colour_scale ** 0.5 * (f - f.mean(0))
    p = pixel_centres(h, w, dtype=f.dtype)  # (h*w, 2) as (x, y) in [0, 1]
    s = position_scale ** 0.5
    q_pos = s * torch.cat([2 * p, torch.ones(h * w, 1)], 1)
    k_pos = s * torch.cat([p, -(p ** 2).sum(1, keepdim=True)], 1)
    q = torch.stack([colour, q_pos])[None]
    k = torch.stack([colour, k_pos])[None]
    return q, k
