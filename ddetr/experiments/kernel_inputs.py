"""Inputs of ``ms_deform_attn`` shaped and distributed like the model's, at the three
shapes the kernel benchmark measures (chapter 5 times the kernels on them too):

    book     the book's CPU model: d_model 128 (M=8, D=16), 4 levels of a 256x256
             image (32x32 .. 4x4, S=1360), encoder queries Lq = S, K=4, N=4
    decoder  the paper's decoder: 4 levels of an 800x1200 image (S=19947),
             Lq=300 object queries, M=8, D=32, K=4, N=2
    encoder  the paper's encoder at the same size: Lq = S = 19947
"""
import torch

from ..analysis import pixel_reference_points
from ..ops import level_start_index_of

SHAPES = {
    # name: (N, [(H, W) per level], M, D, Lq or None for Lq = S, K)
    "book": (4, [(32, 32), (16, 16), (8, 8), (4, 4)], 8, 16, None, 4),
    "decoder": (2, [(100, 150), (50, 75), (25, 38), (13, 19)], 8, 32, 300, 4),
    "encoder": (2, [(100, 150), (50, 75), (25, 38), (13, 19)], 8, 32, None, 4),
}
DESCRIPTIONS = {
    "book": "book CPU model, 256x256 image",
    "decoder": "paper decoder, 800x1200 image, 300 queries",
    "encoder": "paper encoder, 800x1200 image",
}


def sizes_of(name):
    """The sizes of a shape of SHAPES: {"N", "S", "M", "D", "Lq", "L", "K", "levels"}."""
    if name not in SHAPES:
        raise ValueError(f"shape must be one of {list(SHAPES)}, got {name!r}")
    N, levels, M, D, Lq, K = SHAPES[name]
    S = sum(h * w for h, w in levels)
    return dict(N=N, S=S, M=M, D=D, Lq=S if Lq is None else Lq, L=len(levels), K=K,
                levels=levels)


def make_inputs(name, device, dtype=torch.float32, requires_grad=False, seed=0,
                loc_dtype=None):
    """Inputs like the model's. `name` is a key of SHAPES or a dict like sizes_of's;
    value in ``dtype``, locations and weights in ``loc_dtype`` (default ``dtype``; float32
    with a half value is what MSDeformAttn passes under autocast on a GPU).

    Sampling locations are a reference point per query plus offsets of a few pixels,
    as in Deformable DETR: an encoder query (Lq = S) is a pixel and its reference point
    is that pixel's centre; a decoder query has a reference point anywhere in the
    image. Offsets are Gaussian with a standard deviation of 2 pixels of the level
    sampled, so some points fall outside near the borders. (Uniformly random points
    would be a worst case for the caches that no trained model produces.) Attention
    weights are softmax-normalised over the L*K points of each head.

    Returns:
        [value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,),
         sampling_locations (N, Lq, M, L, K, 2), attention_weights (N, Lq, M, L, K)]
    """
    s = sizes_of(name) if isinstance(name, str) else name
    N, S, M, D, Lq, L, K = (s[k] for k in ("N", "S", "M", "D", "Lq", "L", "K"))
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(s["levels"], dtype=torch.int64)
    level_start_index = level_start_index_of(spatial_shapes)
    value = torch.randn(N, S, M, D, generator=gen)
    if Lq == S:  # encoder: the centre of every pixel of every level, in S order
        reference = torch.cat([pixel_reference_points(h, w, N) for h, w in s["levels"]], 1)
    else:  # decoder: anywhere
        reference = torch.rand(N, Lq, 2, generator=gen)
    pixel = 1 / spatial_shapes.flip(1).float().view(1, 1, 1, L, 1, 2)  # (1/W, 1/H)
    offsets = torch.randn(N, Lq, M, L, K, 2, generator=gen) * 2 * pixel
    loc = reference.view(N, Lq, 1, 1, 1, 2) + offsets
    w = torch.randn(N, Lq, M, L * K, generator=gen).softmax(-1).view(N, Lq, M, L, K)
    value = value.to(device=device, dtype=dtype)
    loc, w = (t.to(device=device, dtype=loc_dtype or dtype) for t in (loc, w))
    value, loc, w = (t.contiguous().requires_grad_(requires_grad) for t in (value, loc, w))
    return [value, spatial_shapes.to(device), level_start_index.to(device), loc, w]


def traffic(name, value_size=4, point_size=None):
    """Bytes one forward moves, by kind, for value elements of ``value_size`` bytes and
    locations and weights of ``point_size`` (default: value_size); the output has
    value's type. {"value": value read once, "points": locations and weights (3 numbers
    a point) read once, "output": written once, "gathered": what the kernel requests of
    value: 4 corners of D channels for every point, as if no read were shared}."""
    s = sizes_of(name)
    point_size = point_size or value_size
    points = s["N"] * s["Lq"] * s["M"] * s["L"] * s["K"]
    return {"value": s["N"] * s["S"] * s["M"] * s["D"] * value_size,
            "points": 3 * points * point_size,
            "output": s["N"] * s["Lq"] * s["M"] * s["D"] * value_size,
            "gathered": 4 * points * s["D"] * value_size}


def forward_bytes(name, element_size=4, point_size=None):
    """Bytes the forward must move at least: read value, locations, weights once and
    write the output once (spatial shapes and start indices are negligible); the floor
    of its time is this over the memory bandwidth."""
    t = traffic(name, element_size, point_size)
    return t["value"] + t["points"] + t["output"]


def gather_bytes(name, element_size=4, point_size=None):
    """Bytes the forward moves if no corner read is shared (every corner of every point
    from memory): the gathered corners, locations, weights, output. Against
    forward_bytes it says how much the caches must absorb."""
    t = traffic(name, element_size, point_size)
    return t["gathered"] + t["points"] + t["output"]
