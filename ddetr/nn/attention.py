"""Dense multi-head attention as a module (the attention of DETR).

Parameters are stored exactly as ``torch.nn.MultiheadAttention`` stores them
(``in_proj_weight``, ``in_proj_bias``, ``out_proj``), so weights move between the two
and official DETR / Deformable DETR checkpoints load into it unchanged.
"""
import torch
from torch import nn

from ..ops.dense_attention import multi_head_attention
from .checks import (check_attn_mask, check_dropout, check_heads, check_padding_mask,
                     check_same, check_tensor, check_width)


class MultiHeadAttention(nn.Module):
    """softmax(Q K^T / sqrt(D)) V in M heads, with the projections around it.

    Args:
        d_model: C, the embedding size.
        n_heads: M; each head has D = C / M channels.
        dropout: dropout on the attention weights during training.
    """

    def __init__(self, d_model=256, n_heads=8, dropout=0.0):
        super().__init__()
        check_heads(d_model, n_heads)
        check_dropout(dropout)
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        """query (N, Lq, C), key/value (N, S, C), key_padding_mask (N, S) bool or None,
        attn_mask (Lq, S) bool or None (True: query may not see key).

        Returns out (N, Lq, C) and the attention weights (N, M, Lq, S).
        """
        for name, t, layout in (("query", query, "(N, Lq, C)"), ("key", key, "(N, S, C)"),
                                ("value", value, "(N, S, C)")):
            check_tensor(name, t, layout)
            check_width(name, t, self.d_model)
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key and value must have the same (N, S), got key "
                             f"{tuple(key.shape)} and value {tuple(value.shape)}")
        check_same("batch size", query=query, key=key, value=value)
        check_same("device", query=query, key=key, value=value)
        check_padding_mask("key_padding_mask", key_padding_mask, *key.shape[:2])
        check_attn_mask(attn_mask, query.shape[1], key.shape[1])
        return multi_head_attention(
            query, key, value, self.in_proj_weight, self.in_proj_bias,
            self.out_proj.weight, self.out_proj.bias, self.n_heads, key_padding_mask,
            self.dropout if self.training else 0.0, attn_mask)
