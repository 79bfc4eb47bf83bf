"""The deformable attention module as a diagram with the shapes of one call: the
paper's Fig. 2 (Zhu et al., ICLR 2021), drawn from a real module.

    attn = DeformableAttention(d_model=256, n_heads=8, n_points=4)
    fig = plot_deformable_attention(attn, spatial_shape=(25, 38))

``deformable_attention_trace`` runs the module's steps one by one on a random map
(every pixel a query, as in the encoder, unless ``n_queries`` says otherwise) and
returns every intermediate tensor; the figure labels each box with the shape it
actually had. The steps are those of ``DeformableAttention.forward``, with the
bilinear sampling and the weighted sum written apart so that the (N, Lq, M, K, D)
samples, which the fused operator never stores, can be shown too.
"""
import matplotlib.pyplot as plt
import torch

from ..analysis.complexity import pixel_reference_points
from ..ops.deform_attn import bilinear_sample, deform_attn


def deformable_attention_trace(module, spatial_shape, n_queries=None, batch=1, seed=0):
    """Run ``module`` (a ``ddetr.nn.DeformableAttention``) step by step.

    Args:
        module: the module; its d_model C, n_heads M and n_points K are used.
        spatial_shape: (H, W) of the input map.
        n_queries: Lq; None means every pixel is a query (H*W, reference point = its
            own centre, the encoder's case); otherwise Lq random reference points.
        batch: N. seed: for the random map and reference points.

    Returns:
        dict of tensors: query (N, Lq, C), reference (N, Lq, 2), x (N, H*W, C),
        offsets (N, Lq, M, K, 2) in pixels, locations (N, Lq, M, K, 2), weights
        (N, Lq, M, K), value (N, H*W, M, D), samples (N, Lq, M, K, D), heads (N, Lq, C)
        (the weighted sums, concatenated), out (N, Lq, C).
    """
    H, W = spatial_shape
    M, K, C = module.n_heads, module.n_points, module.d_model
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, H * W, C, generator=g)
    if n_queries is None:
        query, reference = x, pixel_reference_points(H, W, batch=batch)
    else:
        query = torch.randn(batch, n_queries, C, generator=g)
        reference = torch.rand(batch, n_queries, 2, generator=g)
    N, Lq = query.shape[:2]
    with torch.no_grad():
        offsets = module.sampling_offsets(query).view(N, Lq, M, K, 2)
        locations, weights = module.sampling(query, reference, (H, W))
        value = module.value_proj(x).view(N, H * W, M, C // M)
        per_head = value.permute(0, 2, 1, 3).reshape(N * M, H * W, C // M)
        points = locations.permute(0, 2, 1, 3, 4).reshape(N * M, Lq * K, 2)
        samples = bilinear_sample(per_head, (H, W), points).view(N, M, Lq, K, C // M)
        samples = samples.permute(0, 2, 1, 3, 4)                    # (N, Lq, M, K, D)
        heads = (weights[..., None] * samples).sum(3).flatten(2)   # (N, Lq, M*D)
        if not torch.allclose(heads, deform_attn(value, (H, W), locations, weights),
                              atol=1e-5):
            raise RuntimeError("the step-by-step sums disagree with ddetr.ops.deform_attn")
        out = module.output_proj(heads)
    return {"query": query, "reference": reference, "x": x, "offsets": offsets,
            "locations": locations, "weights": weights, "value": value,
            "samples": samples, "heads": heads, "out": out}


def _shape(t):
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _boxes(module, trace, spatial_shape):
    """{key: (x, y, text, colour)} of the diagram's boxes."""
    M, K, C = module.n_heads, module.n_points, module.d_model
    H, W = spatial_shape
    t = {k: _shape(v) for k, v in trace.items()}
    inputs, linear, data = "#f6f6f6", "#eef3fb", "#fdf1dc"
    return {
        "query": (1.6, 7.4, f"query feature z_q\n(N, Lq, C) = {t['query']}", inputs),
        "reference": (1.6, 5.2, f"reference point p_q\n(N, Lq, 2) = {t['reference']}", inputs),
        "x": (1.6, 1.6, f"input feature map x\n{H} x {W}, flattened\n(N, HW, C) = {t['x']}",
              inputs),
        "offsets": (5.7, 7.4, f"Linear sampling_offsets\nC={C} -> 2MK={2 * M * K}\n"
                    f"offsets (N, Lq, M, K, 2)\n= {t['offsets']}", linear),
        "attn": (10.0, 7.6, f"Linear attention_weights\nC={C} -> MK={M * K}, softmax over K\n"
                 f"A (N, Lq, M, K)\n= {t['weights']}", linear),
        "locations": (5.7, 5.2, f"p_q + offsets / (W, H)\nlocations (N, Lq, M, K, 2)\n"
                      f"= {t['locations']}", data),
        "value": (5.7, 1.6, f"Linear value_proj C -> C, split in M={M} heads\n"
                  f"W'_m x (N, HW, M, D)\n= {t['value']}", linear),
        "samples": (5.7, 3.4, f"bilinear sampling, K={K} points a head\n"
                    f"samples (N, Lq, M, K, D) = {t['samples']}", data),
        "sum": (10.0, 3.4, f"sum over K weighted by A,\nconcatenate the heads\n"
                f"(N, Lq, M*D) = {t['heads']}", data),
        "out": (10.0, 1.6, f"Linear output_proj C -> C (the W_m)\n"
                f"output (N, Lq, C) = {t['out']}", linear),
    }


# (from, to, curvature): the query's arrow to the attention weights bends over the
# offsets box
ARROWS = [("query", "offsets", 0), ("query", "attn", -0.12), ("offsets", "locations", 0),
          ("reference", "locations", 0), ("locations", "samples", 0), ("value", "samples", 0),
          ("x", "value", 0), ("samples", "sum", 0), ("attn", "sum", 0), ("sum", "out", 0)]


def plot_deformable_attention(module, spatial_shape, n_queries=None, ax=None):
    """Draw ``module``'s forward pass (Fig. 2 of the paper) with the shapes of one call
    on an H x W map (``deformable_attention_trace``). Returns the Figure."""
    trace = deformable_attention_trace(module, spatial_shape, n_queries)
    boxes = _boxes(module, trace, spatial_shape)
    if ax is None:
        fig, ax = plt.subplots(figsize=(12.5, 6.6))
    else:
        fig = ax.figure
    ax.set_xlim(-0.4, 12.4)
    ax.set_ylim(0.4, 8.9)
    ax.axis("off")
    patches = {}
    for key, (x, y, text, colour) in boxes.items():
        patches[key] = ax.text(x, y, text, ha="center", va="center", fontsize=8,
                               family="monospace", linespacing=1.3,
                               bbox=dict(boxstyle="round,pad=0.4", fc=colour, ec="#456"))
    fig.canvas.draw()   # the boxes' sizes are known only once drawn
    for start, end, rad in ARROWS:
        ax.annotate("", xy=(0.5, 0.5), xycoords=patches[end], xytext=(0.5, 0.5),
                    textcoords=patches[start],
                    arrowprops=dict(arrowstyle="->", color="#456", shrinkA=0, shrinkB=0,
                                    connectionstyle=f"arc3,rad={rad}",
                                    patchA=patches[start].get_bbox_patch(),
                                    patchB=patches[end].get_bbox_patch()))
    M, K, C = module.n_heads, module.n_points, module.d_model
    ax.set_title(f"Deformable attention module (the paper's Fig. 2): C = {C}, M = {M} heads "
                 f"of D = {C // M}, K = {K} points, on a {spatial_shape[0]} x "
                 f"{spatial_shape[1]} map", fontsize=10)
    return fig
