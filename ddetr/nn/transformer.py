"""The dense transformer of DETR (Carion et al., 2020), the baseline of the book.

Encoder: every pixel of one feature map (S = H W tokens) attends to every other pixel,
so one layer costs O(S^2 C): at 800 x 1066 input and stride 32 that is 25 x 34 = 850
tokens, 720k attention weights per head; at stride 8 it would be 180M.
Decoder: Lq learned queries; self-attention among them, cross-attention to all S
tokens of the encoder output, and a feed-forward network. Post-norm layers, and a final
LayerNorm (``decoder.norm``) shared by the outputs of all decoder layers.

Attention is ``ddetr.nn.MultiHeadAttention`` (batch first, parameters stored as in
``nn.MultiheadAttention``); module names follow facebookresearch/detr (``self_attn``,
``multihead_attn``, ``linear1``, ``norm1``...).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .attention import MultiHeadAttention
from .checks import check_heads, check_like, check_tensor, shape
from .helpers import get_clones, with_pos


class TransformerEncoderLayer(nn.Module):
    """Dense self-attention + FFN, post-norm. (N, S, C) -> (N, S, C)."""

    def __init__(self, d_model, n_heads, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src, pos=None, padding_mask=None):
        """src, pos (N, S, C); padding_mask (N, S) bool (True = padding, never attended)."""
        q = k = with_pos(src, pos)
        attn, _ = self.self_attn(q, k, src, key_padding_mask=padding_mask)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout2(ffn))


class TransformerDecoderLayer(nn.Module):
    """Self-attention among queries, cross-attention to the memory, FFN; post-norm."""

    def __init__(self, d_model, n_heads, dim_feedforward=2048, dropout=0.1):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.multihead_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt, memory, query_pos=None, pos=None, memory_padding_mask=None):
        """tgt, query_pos (N, Lq, C); memory, pos (N, S, C); memory_padding_mask (N, S)."""
        q = k = with_pos(tgt, query_pos)
        attn, _ = self.self_attn(q, k, tgt)
        tgt = self.norm1(tgt + self.dropout1(attn))
        attn, _ = self.multihead_attn(with_pos(tgt, query_pos), with_pos(memory, pos), memory,
                                      key_padding_mask=memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(ffn))


class TransformerEncoder(nn.Module):
    def __init__(self, encoder_layer, num_layers):
        super().__init__()
        self.layers = get_clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    def forward(self, src, pos=None, padding_mask=None):
        for layer in self.layers:
            src = layer(src, pos, padding_mask)
        return src


class TransformerDecoder(nn.Module):
    """Returns every layer's output through the shared final norm: (layers, N, Lq, C)."""

    def __init__(self, decoder_layer, num_layers, d_model):
        super().__init__()
        self.layers = get_clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, query_pos=None, pos=None, memory_padding_mask=None):
        hs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, query_pos, pos, memory_padding_mask)
            hs.append(self.norm(tgt))
        return torch.stack(hs)


class Transformer(nn.Module):
    """DETR's encoder-decoder over one feature map.

    Args: d_model C, n_heads M, num_encoder_layers, num_decoder_layers, dim_feedforward,
    dropout.
    """

    def __init__(self, d_model=256, n_heads=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=2048, dropout=0.1):
        super().__init__()
        check_heads(d_model, n_heads, num_encoder_layers=num_encoder_layers,
                    num_decoder_layers=num_decoder_layers, dim_feedforward=dim_feedforward)
        self.d_model, self.n_heads = d_model, n_heads
        self.encoder = TransformerEncoder(
            TransformerEncoderLayer(d_model, n_heads, dim_feedforward, dropout),
            num_encoder_layers)
        self.decoder = TransformerDecoder(
            TransformerDecoderLayer(d_model, n_heads, dim_feedforward, dropout),
            num_decoder_layers, d_model)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos_embed):
        """
        Args:
            src: (N, C, H, W) the projected feature map; mask: (N, H, W) bool;
            query_embed: (Lq, C) learned query positions; pos_embed: (N, C, H, W).

        Returns:
            hs (num_decoder_layers, N, Lq, C) and memory (N, S, C), S = H W.
        """
        check_tensor("src", src, "(N, C, H, W)")
        if src.shape[1] != self.d_model:
            raise ValueError(f"src must be (N, C, H, W) with C = d_model = {self.d_model}, "
                             f"got shape {shape(src)}")
        check_tensor("mask", mask, "(N, H, W)", floating=False)
        if mask.dtype != torch.bool or mask.shape != src.shape[:1] + src.shape[2:]:
            raise ValueError(f"mask must be a bool (N, H, W) = {shape(src)[:1] + shape(src)[2:]} "
                             f"tensor, got {mask.dtype} {shape(mask)}")
        check_tensor("query_embed", query_embed, "(Lq, C)")
        if query_embed.shape[1] != self.d_model:
            raise ValueError(f"query_embed must be (Lq, C) with C = d_model = {self.d_model}, "
                             f"got shape {shape(query_embed)}")
        check_tensor("pos_embed", pos_embed, "(N, C, H, W)")
        check_like("pos_embed", pos_embed, src, "src")
        N = src.shape[0]
        src = src.flatten(2).transpose(1, 2)
        pos = pos_embed.flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        query_pos = query_embed[None].expand(N, -1, -1)
        tgt = torch.zeros_like(query_pos)  # queries start empty; position is all they know
        memory = self.encoder(src, pos, mask)
        hs = self.decoder(tgt, memory, query_pos, pos, mask)
        return hs, memory


def build_transformer(cfg):
    return Transformer(d_model=cfg.d_model, n_heads=cfg.n_heads,
                       num_encoder_layers=cfg.enc_layers, num_decoder_layers=cfg.dec_layers,
                       dim_feedforward=cfg.dim_feedforward, dropout=cfg.dropout)
