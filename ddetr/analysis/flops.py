"""FLOPs of dense and deformable attention: analytic formulas and a measurement.

A FLOP here is one floating-point multiply or add, so a multiply-accumulate counts 2,
the convention of ``torch.utils.flop_counter``: an (m x k) @ (k x n) product costs
2 m k n. The formulas count the matrix products (projections and attention) exactly;
softmax, bias additions and other elementwise work are left out on both sides, as the
flop counter leaves them out.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode


def dense_attention_flops(n_queries, n_keys, d_model, project_kv=True, project_q=True):
    """Matrix-product FLOPs of one dense multi-head attention.

    Args:
        n_queries: Lq. n_keys: S. d_model: C (the number of heads does not matter:
            M heads of D = C / M channels cost as much as one head of C channels).
        project_kv / project_q: count the key+value / query+output projections.

    Returns:
        int: 2 Lq S C (scores Q K^T) + 2 Lq S C (weights @ V)
             + 4 S C^2 (K and V projections) + 4 Lq C^2 (Q and output projections).

    Encoder self-attention over an H x W map has Lq = S = HW: 4 (HW)^2 C + 8 HW C^2,
    quadratic in the number of pixels.
    """
    flops = 4 * n_queries * n_keys * d_model
    if project_kv:
        flops += 4 * n_keys * d_model ** 2
    if project_q:
        flops += 4 * n_queries * d_model ** 2
    return flops


def deformable_sampling_flops(n_queries, d_model, n_levels=1, n_points=4):
    """FLOPs of the bilinear sampling and weighted sum of deformable attention.

    Each of the L K points of a head reads 4 corners of D channels (4 multiplies and
    4 adds per channel) and adds the result, times its attention weight, to the
    output (2 per channel): 10 D per point, 10 Lq L K C in all. These are gathers and
    elementwise operations, which the flop counter does not see.
    """
    return 10 * n_queries * n_levels * n_points * d_model


def ms_deformable_attention_flops(n_queries, n_keys, d_model, n_heads=8, n_levels=1,
                                  n_points=4, with_sampling=True):
    """FLOPs of multi-scale deformable attention (MSDeformAttn).

    Args:
        n_queries: Lq. n_keys: S = sum of H_l W_l. d_model: C. n_heads: M.
        n_levels: L. n_points: K. with_sampling: add ``deformable_sampling_flops``.

    Returns:
        int: 2 S C^2 (value projection) + 2 Lq C^2 (output projection)
             + 2 Lq C (3 M L K) (offsets, 2 per point, and attention logits)
             [+ 10 Lq L K C sampling]. Linear in S and in Lq.
    """
    M, L, K = n_heads, n_levels, n_points
    flops = 2 * n_keys * d_model ** 2 + 2 * n_queries * d_model ** 2
    flops += 2 * n_queries * d_model * 3 * M * L * K
    if with_sampling:
        flops += deformable_sampling_flops(n_queries, d_model, L, K)
    return flops


def deformable_attention_flops(n_queries, n_keys, d_model, n_heads=8, n_points=4,
                               with_sampling=True):
    """Single-scale deformable attention: ``ms_deformable_attention_flops`` with L=1."""
    return ms_deformable_attention_flops(n_queries, n_keys, d_model, n_heads, 1,
                                         n_points, with_sampling)


def ffn_flops(n_tokens, d_model, dim_feedforward):
    """FLOPs of a transformer layer's feed-forward network, two linear layers
    C -> F -> C on each of n_tokens tokens: 4 n_tokens C F."""
    return 4 * n_tokens * d_model * dim_feedforward


def level_sizes(height, width, strides=(8, 16, 32, 64)):
    """The (H_l, W_l) of the stride-s maps of a height x width image, ceil(H / s) x
    ceil(W / s) (what the backbone's stride-2 convolutions and the extra stride-2
    levels give), finest first."""
    return [(-(-height // s), -(-width // s)) for s in strides]


def measure_flops(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` under FlopCounterMode; return (total FLOPs, per-op dict).

    Only operators with a registered formula are counted: matrix products
    (mm, bmm, addmm, matmul, linear...) and convolutions. grid_sample, gather, softmax
    and elementwise arithmetic count zero.
    """
    mode = FlopCounterMode(display=False)
    with mode:
        fn(*args, **kwargs)
    per_op = {str(op): int(n) for op, n in mode.get_flop_counts().get("Global", {}).items()}
    return int(mode.get_total_flops()), per_op


def model_flops(model, height=800, width=1216, with_sampling=False, by_op=False):
    """FLOPs of one forward pass of a detector on a zero image of height x width, batch 1.

    The matrix products and convolutions are measured (``measure_flops``: a multiply-add
    counts 2). With ``with_sampling=True`` the bilinear sampling of every deformable
    attention call, which the flop counter does not see, is added:
    ``deformable_sampling_flops`` of the queries each MSDeformAttn / DeformableAttention
    module received in this very pass (so two-stage, padding and the number of levels
    are whatever the model did). The model's parameters are set to requires_grad=False
    for the pass and restored.

    Returns the total, or with ``by_op=True`` (total, {operator: FLOPs}) where the
    sampling, when counted, is the entry "bilinear sampling".
    """
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval().requires_grad_(False)
    sampling = []
    hooks = [m.register_forward_pre_hook(_count_sampling(sampling))
             for m in model.modules() if with_sampling and hasattr(m, "n_points")]
    try:
        with torch.no_grad():
            images = torch.zeros(1, 3, height, width)
            masks = torch.zeros(1, height, width, dtype=torch.bool)
            total, per_op = measure_flops(model, images, masks)
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if with_sampling:
        per_op["bilinear sampling"] = sum(sampling)
        total += per_op["bilinear sampling"]
    return (total, per_op) if by_op else total


def _count_sampling(counts):
    """A forward pre-hook for a deformable attention module: append the sampling FLOPs
    of its call (query (N, Lq, C) is the first argument) to the list counts."""
    def hook(module, args):
        N, Lq, C = args[0].shape
        counts.append(deformable_sampling_flops(N * Lq, C, getattr(module, "n_levels", 1),
                                                module.n_points))
    return hook
