"""Dense (DETR) attention: every query looks at every key.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(D)) V

computed per head. The weights matrix has one row per query and one column per key,
so for an encoder over an H x W feature map it has (H W)^2 entries per head: the cost
that deformable attention removes.
"""
import math

import torch.nn.functional as F


def scaled_dot_product_attention(q, k, v, key_padding_mask=None, dropout_p=0.0,
                                 attn_mask=None):
    """Attention of every query over every key, per head.

    Args:
        q: (N, M, Lq, D) queries.
        k: (N, M, S, D) keys.
        v: (N, M, S, D) values.
        key_padding_mask: optional (N, S) bool, True where a key is padding (ignored).
        dropout_p: dropout on the attention weights (training only).
        attn_mask: optional (Lq, S) bool, True where a query may not see a key (every
            query must see at least one).

    Returns:
        out (N, M, Lq, D) and weights (N, M, Lq, S), rows summing to 1.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (N, M, Lq, S)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


def multi_head_attention(query, key, value, in_proj_weight, in_proj_bias,
                         out_proj_weight, out_proj_bias, n_heads,
                         key_padding_mask=None, dropout_p=0.0, attn_mask=None):
    """Multi-head attention with packed input projections, like nn.MultiheadAttention.

    Args:
        query: (N, Lq, C); key, value: (N, S, C).
        in_proj_weight: (3C, C), rows for the q, k and v projections in that order.
        in_proj_bias: (3C,) or None.
        out_proj_weight: (C, C); out_proj_bias: (C,) or None.
        n_heads: M, with C = M * D.
        key_padding_mask (N, S), attn_mask (Lq, S): see scaled_dot_product_attention.

    Returns:
        out (N, Lq, C) and weights (N, M, Lq, S) per head.
    """
    N, Lq, C = query.shape
    if C % n_heads:
        raise ValueError(f"embedding dim C={C} must be divisible by n_heads={n_heads}")
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(f"key and value must share (N, S), got {tuple(key.shape)} "
                         f"and {tuple(value.shape)}")
    D = C // n_heads
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None,) * 3

    def heads(x, w, b):  # (N, L, C) -> (N, M, L, D)
        return F.linear(x, w, b).view(x.shape[0], x.shape[1], n_heads, D).transpose(1, 2)

    out, weights = scaled_dot_product_attention(
        heads(query, w_q, b_q), heads(key, w_k, b_k), heads(value, w_v, b_v),
        key_padding_mask, dropout_p, attn_mask)
    out = out.transpose(1, 2).reshape(N, Lq, C)
    return F.linear(out, out_proj_weight, out_proj_bias), weights
