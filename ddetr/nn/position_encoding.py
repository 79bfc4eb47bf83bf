"""Sine position encoding of a (padded) feature map, as in DETR and Deformable DETR.

Attention itself knows nothing about where a pixel is, so each pixel's feature gets a
position code added to its query (and, in DETR, its key). The code of pixel (y, x) is
a bank of sines and cosines of its coordinates at geometrically spaced frequencies:
C/2 channels for y followed by C/2 channels for x.

Padding: a batch holds images of different sizes padded to a common one, with a mask
(True = padding). The coordinates count only valid pixels (a cumulative sum of the
not-padding mask) and are normalised by the image's own valid height and width, so an
image gets the same codes whether or not it is padded, and the code tells a pixel where
it is *in its image*, not in the padded canvas. Pixel centres sit at (i + 0.5) / H,
the convention of the official Deformable DETR (DETR itself uses (i + 1) / H).

``sine_embed`` is the bank of sines itself, for any coordinates: the decoder uses it
for the boxes of two-stage proposals and of DAB-style anchor queries.
"""
import math

import torch
from torch import nn


def sine_embed(coords, num_pos_feats=128, temperature=10000, scale=2 * math.pi):
    """Sine codes of coordinates, num_pos_feats channels per coordinate.

    Args:
        coords: (..., k), e.g. (N, H, W, 2) pixel coordinates (y, x) or (N, Lq, 4) boxes
            (cx, cy, w, h), usually in [0, 1].
        num_pos_feats: F, channels per coordinate; channel pair (2i, 2i + 1) holds
            sin and cos of coords * scale / temperature^(2i / F).

    Returns:
        (..., k * F): one block of F channels per coordinate, in the order given;
        float32 for float32 or half-precision coordinates.
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos = coords[..., None] * scale / dim_t  # (..., k, F)
    # interleave: sin on even channels, cos on odd channels
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    return pos.flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Args:
        num_pos_feats: channels per axis (C / 2 for a model of width C).
        temperature: the largest wavelength is 2 pi * temperature (in units of scale).
        normalize: map coordinates to [0, scale] of the valid image (ddetr's models use
            True, the default; False codes the pixel index 1, 2, ... itself, as DETR's
            default does; the name and the option are the official code's).
        scale: 2 pi, so that one image spans one turn of the fastest sine.
    """

    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True, scale=None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, mask):
        """mask (N, H, W) bool, True = padding -> pos (N, 2 * num_pos_feats, H, W) float32."""
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be (N, H, W) bool, got {tuple(mask.shape)} "
                             f"{mask.dtype}")
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # 1..H_valid down each column
        x_embed = not_mask.cumsum(2, dtype=torch.float32)  # 1..W_valid along each row
        scale = 1.0
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps)
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps)
            scale = self.scale
        coords = torch.stack((y_embed, x_embed), -1)  # (N, H, W, 2): y codes, then x
        pos = sine_embed(coords, self.num_pos_feats, self.temperature, scale)
        return pos.permute(0, 3, 1, 2)


def build_position_encoding(cfg):
    """The sine encoding with d_model channels in all (d_model / 2 per axis)."""
    return PositionEmbeddingSine(cfg.d_model // 2)
