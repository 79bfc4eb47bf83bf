"""Dense against deformable encoder attention as the feature map grows.

``attention_sweep`` runs one encoder self-attention layer of each kind (every pixel
is a query) on H x W maps of growing size and records, per size, the FLOPs (analytic
and measured), the peak memory of the tensors it creates and the time it takes.
"""
import torch

from ..nn import DeformableAttention, MultiHeadAttention
from ..nn.geometry import pixel_centres
from .flops import deformable_attention_flops, dense_attention_flops, measure_flops
from .measure import peak_memory, time_fn


def pixel_reference_points(H, W, batch=1, dtype=torch.float32):
    """(batch, H*W, 2) the centres ((j + 0.5) / W, (i + 0.5) / H) of all pixels,
    row-major: the reference points of encoder queries."""
    return pixel_centres(H, W, dtype=dtype)[None].expand(batch, -1, -1)


def dense_encoder_attention(module, x):
    """Dense self-attention of a (N, H*W, C) map: every pixel attends to every pixel."""
    return module(x, x, x)[0]


def deformable_encoder_attention(module, x, reference_points, spatial_shape):
    """Deformable self-attention: every pixel samples K points around itself per head."""
    return module(x, reference_points, x, spatial_shape)


def attention_sweep(sides, d_model=256, n_heads=8, n_points=4, repeats=3, seed=0,
                    measure_time=True):
    """Measure dense and deformable encoder self-attention on side x side maps.

    Args:
        sides: map sizes (a square map has side^2 pixels).
        d_model, n_heads, n_points: C, M, K of the two layers.
        repeats: timing runs (median).

    Returns:
        dict of lists, one entry per side: "side", "pixels", and for kind in
        ("dense", "deform"): f"{kind}_flops" (analytic, matrix products for dense,
        + bilinear sampling for deformable), f"{kind}_flops_measured"
        (FlopCounterMode), f"{kind}_peak_bytes", f"{kind}_seconds".
    """
    torch.manual_seed(seed)
    dense = MultiHeadAttention(d_model, n_heads).eval()
    deform = DeformableAttention(d_model, n_heads, n_points).eval()
    out = {k: [] for k in ("side", "pixels")}
    for kind in ("dense", "deform"):
        for what in ("flops", "flops_measured", "peak_bytes", "seconds"):
            out[f"{kind}_{what}"] = []
    with torch.no_grad():
        for side in sides:
            hw = side * side
            x = torch.randn(1, hw, d_model)
            ref = pixel_reference_points(side, side)
            runs = {
                "dense": (lambda: dense_encoder_attention(dense, x)),
                "deform": (lambda: deformable_encoder_attention(deform, x, ref,
                                                                (side, side))),
            }
            out["side"].append(side)
            out["pixels"].append(hw)
            out["dense_flops"].append(dense_attention_flops(hw, hw, d_model))
            out["deform_flops"].append(deformable_attention_flops(hw, hw, d_model,
                                                                  n_heads, n_points))
            for kind, run in runs.items():
                out[f"{kind}_flops_measured"].append(measure_flops(run)[0])
                out[f"{kind}_peak_bytes"].append(peak_memory(run)[0])
                out[f"{kind}_seconds"].append(
                    time_fn(run, repeats=repeats) if measure_time else float("nan"))
    return out
